"""Names of what crosses between server and client, in one place (the wire contract)."""

ARRAYS = "arrays"  # the adapter, as a list of float32 arrays in adapter_names() order
NUM_EXAMPLES = "num-examples"  # examples the client trained on this round (FedAvg weight)
TRAIN_LOSS = "train-loss"
STEPS = "steps"
TOKENS = "tokens"
SECONDS = "seconds"
SERVER_ROUND = "server-round"
