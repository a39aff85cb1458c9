"""The runtimes: how a round's instructions reach the clients. ``inprocess`` trains them in
turn on one model; ``flower`` sends them to SuperNodes over Flower's Grid. They never
import each other; ``model_side`` builds what both hand the round loop."""
