"""SDT in TRL's trainers: `SDTSFTTrainer` and `SDTDPOTrainer`, TRL's classes plus `sdt_config=` and everything
`SDTTrainer` does (`SDTTrainerMixin`: conversion, schedule and drop/grow, `sdt/*` metrics, adapter or weights +
masks checkpoints, exact resume, the SDT card). Needs `pip install "hf-sdt[trl]"`.

In updates mode `SDTDPOTrainer` with `ref_model=None` takes its reference log-probs from the policy itself with its
updates switched off (`hf_sdt.disable_updates`), as TRL does for a PEFT adapter: no second copy of the model, and
`trainer.ref_model` stays None. In weights mode it keeps TRL's own reference (a copy of the model, or the one
passed).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .model import disable_updates
from .trainer import SDTTrainerMixin, converted_model

try:
    import trl
except ImportError as error:  # pragma: no cover - the message is tested with trl hidden
    raise ImportError(
        'hf_sdt.SDTSFTTrainer and hf_sdt.SDTDPOTrainer need TRL: pip install "hf-sdt[trl]" (or pip install trl).'
    ) from error


class SDTSFTTrainer(SDTTrainerMixin, trl.SFTTrainer):
    """TRL's `SFTTrainer` with Sparse-Dynamic Training: the same arguments plus `sdt_config` (see `SDTTrainer`).

    Example:
        >>> trainer = SDTSFTTrainer(model, args=SFTConfig("out"), train_dataset=dataset,  # doctest: +SKIP
        ...                         sdt_config=SDTConfig(mode="updates"))
        >>> trainer.train()  # doctest: +SKIP
    """


class _BaseModelReference(nn.Module):
    """The policy as DPO's reference: every call runs it under `disable_updates` and `no_grad`. It holds no
    parameters (the policy is kept outside the module tree) and forwards attribute lookups (config, backbone, LM
    head) to the policy, so that TRL can patch and call it as a model."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.__dict__["policy"] = policy

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["policy"], name)

    def forward(self, *args, **kwargs):
        return self.__dict__["policy"](*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), disable_updates(self.__dict__["policy"]):
            return super().__call__(*args, **kwargs)


class SDTDPOTrainer(SDTTrainerMixin, trl.DPOTrainer):
    """TRL's `DPOTrainer` with Sparse-Dynamic Training: the same arguments, `DPOTrainer(model, ref_model, args,
    ...)`, plus `sdt_config`. In updates mode with `ref_model=None` the reference is the base model itself (the
    policy with its updates disabled); `ref_model` stays None and the first loss is log 2.

    Example:
        >>> trainer = SDTDPOTrainer(model, args=DPOConfig("out"), train_dataset=pairs,  # doctest: +SKIP
        ...                         sdt_config=SDTConfig(mode="updates"))
        >>> trainer.ref_model is None  # doctest: +SKIP
        True
    """

    def __init__(self, model=None, ref_model=None, *trainer_args, sdt_config=None, **kwargs):
        model, sdt_config = converted_model(model, sdt_config, type(self).__name__)
        base_reference = ref_model is None and sdt_config.mode == "updates"
        # TRL copies the model when given no reference; the view of the policy stands in for it, then leaves
        # `ref_model` None outside the reference forwards (`_reference_is_the_base_model`).
        reference = _BaseModelReference(model) if base_reference else ref_model
        self._base_model_reference = None  # TRL's __init__ may precompute reference log-probs: from `reference`
        super().__init__(model, reference, *trainer_args, sdt_config=sdt_config, **kwargs)
        self._base_model_reference = self.ref_model if base_reference else None
        if base_reference:
            self.ref_model = None

    @contextlib.contextmanager
    def _reference_is_the_base_model(self):
        if self._base_model_reference is None:
            yield
            return
        self.ref_model = self._base_model_reference
        try:
            yield
        finally:
            self.ref_model = None

    def _compute_loss(self, *args, **kwargs):
        """TRL's loss, its reference forward on the base model (in updates mode without `ref_model`)."""
        with self._reference_is_the_base_model():
            return super()._compute_loss(*args, **kwargs)

    def compute_ref_log_probs(self, *args, **kwargs):
        """TRL's reference log-probs, from the base model (in updates mode without `ref_model`)."""
        with self._reference_is_the_base_model():
            return super().compute_ref_log_probs(*args, **kwargs)

    def _precompute_ref_logps(self, *args, **kwargs):
        """TRL's precomputed reference log-probs (`precompute_ref_log_probs=True`), from the base model."""
        with self._reference_is_the_base_model():
            return super()._precompute_ref_logps(*args, **kwargs)
