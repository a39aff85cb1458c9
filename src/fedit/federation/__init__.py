"""The federation layer: the round loop (``loop``), the checks a reply passes
(``replies``), checkpoints and resume (``checkpoint``), the run folder (``rundir``) and the
one run set-up both runtimes use (``setup``). It moves numpy arrays: what it needs of a
model comes in as callbacks (``setup.ModelSide``)."""
