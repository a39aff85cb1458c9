"""Names of what crosses between server and client, in one place (the wire contract)."""

ARRAYS = "arrays"  # the adapter, as a list of float32 arrays in adapter_names() order
NUM_EXAMPLES = "num-examples"  # examples the client trained on this round (FedAvg weight)
TRAIN_LOSS = "train-loss"
STEPS = "steps"
TOKENS = "tokens"
SECONDS = "seconds"
SERVER_ROUND = "server-round"
CLIENT = "client"  # the client id a round's message is for (its partition id in demos)
RUN_CONFIG = "fedit-config"  # the resolved run config as TOML text (model, LoRA, trainer)
PARTITION_ID = "partition-id"  # a SuperNode's node-config key, and its answer to "hello"
NUM_PARTITIONS = "num-partitions"  # node-config key: must equal partition.clients
DATA_PATH = "data-path"  # node-config key: the party's own training file, never sent
STRATEGY = "strategy"  # hello: a user's strategy ("module:Class") the node must import
REFUSED = "refused"  # hello answer: why this node cannot take part (one line)
# Record names inside a Flower message
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
# Client state on a SuperNode (it never leaves the party's machine)
STATE_DIR = "state-dir"  # node-config key: where this node keeps client states
STATE_ROUND = "state-round"  # instruction key: start from the state saved in this round (0: none)
STATE_SAVED = "state-saved"  # reply metric: 1.0 when the client saved a state this round
# No held-out prompt is trained on (fedit.data.dedup)
HELD_OUT = "held-out-prompts"  # instruction key: held-out prompt hashes (sha256 hex, " "-joined)
HELD_OUT_DUPLICATES = "held-out-duplicates"  # reply metric: training rows the client dropped
