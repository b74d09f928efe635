"""DC-GRPO's algorithm core: small pure torch functions, no I/O.

Modules: ``discrepancy`` (Eq. 5-7), ``advantage`` (GRPO, Eq. 8-10 penalty,
TIS/MIS/IcePop baselines), ``dual`` (Eq. 11), ``loss`` (Eq. 12), ``methods``
(the registry the training loops dispatch through), ``step`` (the one step kernel both backends call).

The submodules are imported by name (``from dcgrpo.algorithm import advantage``), not here: ``methods`` (the
registry) imports no torch, so the config can check method names against it on the light image.
"""
