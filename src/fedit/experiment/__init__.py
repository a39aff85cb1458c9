"""``fedit experiment``: the FedIT paper's arms on one split and one base model (``run``),
their scales (``scales``), repeated over seeds (``seeds``) with paired differences
(``paired``)."""
