"""DC-GRPO's algorithm core: small pure torch functions, no I/O.

Modules: ``discrepancy`` (Eq. 5-7), ``advantage`` (GRPO, Eq. 8-10 penalty,
TIS/MIS/IcePop baselines), ``dual`` (Eq. 11), ``loss`` (Eq. 12), ``methods``
(the registry the training loops dispatch through).
"""

from dcgrpo.algorithm import advantage, discrepancy, dual, loss, methods

__all__ = ["advantage", "discrepancy", "dual", "loss", "methods"]
