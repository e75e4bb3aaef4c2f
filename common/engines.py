"""Training and inference engines shared by the bundles.

- :class:`SemiSupervisedTrainer` — MONAI ``SupervisedTrainer`` that also draws one unlabeled batch per
  iteration from a second loader and may step several optimizers; subclasses only say how the losses of one
  iteration are computed (:meth:`SemiSupervisedTrainer.compute_losses`).
- :class:`MeanTeacherTrainer` — MT²: supervised warm-up, then a teacher copied from the student and updated by
  EMA after every optimizer step, with a consistency loss on CutMixed unlabeled views.
- :class:`CrossTeachingTrainer` — CrossCT: two networks, each supervised on labeled batches, teaching each
  other on unlabeled batches with a Gaussian ramp-up of the cross-teaching weight.
- :class:`FolderEvaluator` — inference/evaluation over a folder that skips images which cannot be read,
  names them in the log, and fails at the end so the exit status says something went wrong.

Everything runs through ``python -m monai.bundle run`` and MONAI Label: the trainers keep
``SupervisedTrainer``'s constructor, events and output keys.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Sequence

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from ignite.engine import Events
from torch import nn

from common.augment import CutMixer
from common.distributed import gather_lists, rank_and_world_size
from common.folders import failure_message, unreadable_input_cause
from common.losses import cross_teaching_loss, gaussian_rampup
from common.precision import autocast, autocast_dtype

__all__ = [
    "SemiSupervisedTrainer",
    "MeanTeacherTrainer",
    "CrossTeachingTrainer",
    "FolderEvaluator",
    "ema_update",
    "unwrapped",
]

logger = logging.getLogger(__name__)


class SemiSupervisedTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` with an unlabeled loader and optional extra optimizers.

    ``epoch_length`` follows the labeled loader; the unlabeled loader is cycled (re-created, with
    ``DistributedSampler.set_epoch`` when it has one, whenever it runs out).

    Args:
        unlabeled_data_loader: loader of unlabeled batches (dicts), or None for supervised-only training.
        extra_optimizers: optimizers stepped after ``optimizer`` (e.g. the second network of a pair).
        amp: "auto", True or False (see :mod:`common.precision`): float16 autocast with a gradient scaler on
            CUDA, bfloat16 autocast on a CPU that runs it natively; losses are computed in float32.
        kwargs: everything ``SupervisedTrainer`` takes.
    """

    def __init__(
        self,
        *args,
        unlabeled_data_loader=None,
        extra_optimizers: Sequence[torch.optim.Optimizer] = (),
        amp: Any = False,
        **kwargs,
    ):
        device = kwargs.get("device", args[0] if args else "cpu")
        dtype = autocast_dtype(amp, device)
        # MONAI's own amp switch means "float16 with a gradient scaler on CUDA"; bfloat16 needs no scaler
        super().__init__(*args, amp=dtype == torch.float16, **kwargs)
        self.autocast_dtype = dtype
        self.unlabeled_wait_seconds = 0.0  # time spent waiting for unlabeled batches (see common.throughput)
        self.unlabeled_data_loader = unlabeled_data_loader
        self.extra_optimizers = list(extra_optimizers)
        self._unlabeled_iterator = None
        self._unlabeled_epoch = 0

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *self.extra_optimizers]

    def next_unlabeled_batch(self) -> dict | None:
        """The next unlabeled batch moved to the engine's device, or None without an unlabeled loader."""
        if self.unlabeled_data_loader is None:
            return None
        started = time.perf_counter()
        # Called inside the step's autocast: the transforms (run here when num_workers is 0) and the loader
        # workers (forked from this thread, inheriting its autocast state) must run in float32. Under bfloat16
        # autocast a transform's convolution returns bfloat16, which numpy cannot hold.
        with torch.autocast("cpu", enabled=False):
            batch = self._draw_unlabeled_batch()
        self.unlabeled_wait_seconds += time.perf_counter() - started
        return {
            key: value.to(self.state.device, non_blocking=self.non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }

    def _draw_unlabeled_batch(self) -> dict:
        if self._unlabeled_iterator is None:
            self._unlabeled_iterator = iter(self.unlabeled_data_loader)
        try:
            return next(self._unlabeled_iterator)
        except StopIteration:
            self._unlabeled_epoch += 1
            sampler = getattr(self.unlabeled_data_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self._unlabeled_epoch)
            self._unlabeled_iterator = iter(self.unlabeled_data_loader)
            return next(self._unlabeled_iterator)

    def in_float32(self, loss_function: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        """``loss_function(*tensors)`` on float32 copies, outside the step's autocast. Under bfloat16 autocast a
        loss's own convolutions (SSIM's Gaussian window) run in bfloat16, where a local variance E[x²] - E[x]²
        loses more than SSIM's constant C2 = 9e-4: a real MT² run's loss went to -inf at step 26, NaN after."""
        with torch.autocast(self.state.device.type, enabled=False):
            return loss_function(*(tensor.float() for tensor in tensors))

    def train_networks(self) -> list[nn.Module]:
        """Networks put in train mode each iteration."""
        return [self.network]

    def compute_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One iteration's forward pass: returns the network prediction for ``inputs`` and a dict of loss
        terms whose ``"loss"`` entry is the total to back-propagate. Subclasses override."""
        prediction = self.inferer(inputs, self.network)
        return prediction, {"loss": self.in_float32(self.loss_function, prediction, targets).mean()}

    def after_step(self) -> None:
        """Called after the optimizers stepped (e.g. EMA updates)."""

    def _iteration(self, engine: SemiSupervisedTrainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, *_ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        for network in engine.train_networks():
            network.train()
        for optimizer in engine.optimizers:
            optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        scaler = engine.scaler if engine.amp else None
        with autocast(engine.autocast_dtype, engine.state.device):
            engine.state.output[Keys.PRED], losses = engine.compute_losses(inputs, targets)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = losses["loss"]
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        for optimizer in engine.optimizers:
            scaler.step(optimizer) if scaler is not None else optimizer.step()
        if scaler is not None:
            scaler.update()
        engine.after_step()
        for name, value in losses.items():
            if name != "loss":
                engine.state.output[name] = value.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates the output on this event
        return engine.state.output


def unwrapped(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper, or ``network`` itself."""
    return getattr(network, "module", network)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for every parameter; buffers (normalization
    statistics) are copied from the student, since an average of running statistics is not a statistic of
    the averaged weights."""
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.mul_(decay).add_(student_param.detach(), alpha=1.0 - decay)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers()):
        teacher_buffer.copy_(student_buffer)


def _split_forward(network: nn.Module, labeled: torch.Tensor, unlabeled: torch.Tensor | None):
    """``network`` on the labeled and unlabeled batches in ONE forward pass (split after): cheaper, and a
    DistributedDataParallel network allows only one forward before each backward. Returns the two outputs
    (the second None without an unlabeled batch). Patches of both batches have the same size."""
    if unlabeled is None:
        return network(labeled), None
    outputs = network(torch.cat([labeled, unlabeled]))
    return outputs[: len(labeled)], outputs[len(labeled) :]


class MeanTeacherTrainer(SemiSupervisedTrainer):
    """MT²'s multi-task mean teacher.

    Each iteration: the supervised loss on the labeled batch (CutMixed with ``cutmix``'s probability); after
    ``warmup_epochs`` also the consistency loss between the student on the strong unlabeled view (CutMixed) and
    the teacher's cell and boundary heat-maps on the weak view, mixed by the same box. The teacher is copied from
    the student when the first epoch after the warm-up starts and follows it by EMA after every optimizer step.

    Args:
        teacher_network: a network of the student's architecture.
        ema_decay: EMA decay beta (0.995 in the paper's code).
        warmup_epochs: supervised-only epochs before the teacher is created.
        consistency_weight: weight of the consistency loss.
        cutmix: the CutMix applied to labeled batches and to strong unlabeled views (None: no CutMix).
        unlabeled_image_keys: keys of the weak and strong views in an unlabeled batch.
        consistency_loss: callable(student_logits, teacher_heatmaps) -> loss.
        kwargs: everything ``SemiSupervisedTrainer`` takes (``loss_function`` is the supervised loss).
    """

    def __init__(
        self,
        *args,
        teacher_network: nn.Module,
        consistency_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        ema_decay: float = 0.995,
        warmup_epochs: int = 0,
        consistency_weight: float = 1.0,
        cutmix: CutMixer | None = None,
        unlabeled_image_keys: tuple[str, str] = ("image", "image_strong"),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.teacher_network = teacher_network
        self.consistency_loss = consistency_loss
        self.ema_decay = ema_decay
        self.warmup_epochs = warmup_epochs
        self.consistency_weight = consistency_weight
        self.cutmix = cutmix
        self.unlabeled_image_keys = unlabeled_image_keys
        for parameter in self.teacher_network.parameters():
            parameter.requires_grad_(False)
        self.add_event_handler(Events.EPOCH_STARTED, self._start_teacher_after_warmup)

    @property
    def teaching(self) -> bool:
        """True once the warm-up is over and there is unlabeled data."""
        return self.unlabeled_data_loader is not None and self.state.epoch > self.warmup_epochs

    def _start_teacher_after_warmup(self, engine: MeanTeacherTrainer) -> None:
        # a run resumed later than this epoch restores the teacher from its checkpoint instead
        if engine.unlabeled_data_loader is not None and engine.state.epoch == engine.warmup_epochs + 1:
            engine.teacher_network.load_state_dict(unwrapped(engine.network).state_dict())
            logger.info("epoch %d: teacher initialised from the student", engine.state.epoch)

    def compute_losses(self, inputs, targets):
        if self.cutmix is not None:
            (inputs, targets), _, _ = self.cutmix([inputs, targets])
        if not self.teaching:
            prediction = self.network(inputs)
            supervised = self.in_float32(self.loss_function, prediction, targets).mean()
            return prediction, {"loss": supervised, "loss_supervised": supervised.detach()}

        unlabeled = self.next_unlabeled_batch()
        weak, strong = (unlabeled[key] for key in self.unlabeled_image_keys)
        self.teacher_network.eval()
        with torch.no_grad():
            teacher_heatmaps = torch.sigmoid(self.teacher_network(weak)[:, 3:5].float())
        if self.cutmix is not None:
            (strong, teacher_heatmaps), _, _ = self.cutmix([strong, teacher_heatmaps])
        prediction, student_strong = _split_forward(self.network, inputs, strong)
        supervised = self.in_float32(self.loss_function, prediction, targets).mean()
        consistency = self.in_float32(self.consistency_loss, student_strong, teacher_heatmaps)
        total = supervised + self.consistency_weight * consistency
        return prediction, {"loss": total, "loss_supervised": supervised.detach(), "loss_consistency": consistency.detach()}

    def after_step(self) -> None:
        if self.teaching:
            ema_update(self.teacher_network, unwrapped(self.network), self.ema_decay)


class CrossTeachingTrainer(SemiSupervisedTrainer):
    """CrossCT: a CNN (``network``) and a transformer (``second_network``) trained together.

    Labeled batch: the supervised loss of each network. Unlabeled batch (when there is an unlabeled loader):
    ``lambda(t) * cross_teaching_loss(A(u), B(u))`` is added, each network learning from the other's detached
    pseudo-labels and distance maps, with ``lambda(t) = max_weight * exp(-5 (1 - t/T)^2)``, t the iterations
    done by this trainer and T = ``rampup_iterations``. Without an unlabeled loader this is the supervised
    pre-training of both networks (CrossCT's first stage).

    Args:
        second_network: network B; ``network`` is A.
        second_optimizer: B's optimizer (``optimizer`` is A's).
        rampup_iterations: T of the ramp-up, in iterations.
        max_cross_weight: lambda at t >= T (0.1 in CrossCT).
        kwargs: everything ``SemiSupervisedTrainer`` takes (``loss_function`` is one network's supervised loss).
    """

    def __init__(
        self,
        *args,
        second_network: nn.Module,
        second_optimizer: torch.optim.Optimizer,
        rampup_iterations: int = 1,
        max_cross_weight: float = 0.1,
        **kwargs,
    ):
        super().__init__(*args, extra_optimizers=[second_optimizer], **kwargs)
        self.second_network = second_network
        self.rampup_iterations = rampup_iterations
        self.max_cross_weight = max_cross_weight

    def train_networks(self) -> list[nn.Module]:
        return [self.network, self.second_network]

    def cross_weight(self) -> float:
        """lambda(t) for the current iteration (1-based in ignite; t counts the iterations done before it)."""
        return gaussian_rampup(self.state.iteration - 1, self.rampup_iterations, self.max_cross_weight)

    def compute_losses(self, inputs, targets):
        unlabeled = self.next_unlabeled_batch()
        images = unlabeled["image"] if unlabeled is not None else None
        prediction, outputs_a = _split_forward(self.network, inputs, images)
        labeled_b, outputs_b = _split_forward(self.second_network, inputs, images)
        supervised_a = self.in_float32(self.loss_function, prediction, targets).mean()
        supervised_b = self.in_float32(self.loss_function, labeled_b, targets).mean()
        losses = {"loss_supervised_a": supervised_a.detach(), "loss_supervised_b": supervised_b.detach()}
        total = supervised_a + supervised_b
        if images is not None:
            weight = self.cross_weight()
            cross = self.in_float32(cross_teaching_loss, outputs_a, outputs_b)
            total = total + weight * cross
            losses.update(loss_cross=cross.detach(), cross_weight=torch.tensor(weight))
        return prediction, {"loss": total, **losses}


class FolderEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` for segmenting a folder: batches whose images could not be loaded arrive as
    ``{"failed": [messages]}`` (see :func:`common.folders.collate_skipping_failures`) and are skipped and logged;
    when the run completes, a ``RuntimeError`` names every failed file, so the process exits non-zero after the
    good images were written.

    Images listed under ``"whole_slide"`` (paths set aside unloaded by :class:`common.folders.TolerantDataset`)
    are segmented tile by tile by ``whole_slide`` (:class:`common.wholeslide.WholeSlideSegmenter`) with this
    engine's network, inferer, device and AMP setting; it writes them itself, so the ``postprocessing`` of the
    engine never sees them. Their output item is ``{"pred": (1, H, W) int32 label, "image": an empty MetaTensor
    whose metadata names the file}``, so handlers that report or collect labels see them as any other image.

    Under ``torchrun`` each process segments its share of the folder (``configs/multi_gpu_inference.yaml``); at
    the end the failures of every process are gathered, rank 0 names them all and every process fails, so the
    run ends as a single-process run would. A process whose share is empty still takes part in that gathering.

    Args:
        whole_slide: the whole-slide segmenter, or None when no batch lists whole-slide images.
        args, kwargs: everything ``SupervisedEvaluator`` takes.
    """

    def __init__(self, *args, whole_slide=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.whole_slide = whole_slide
        self.failures: list[str] = []
        self.add_event_handler(Events.COMPLETED, self._raise_on_failures)

    def _iteration(self, engine: FolderEvaluator, batchdata: dict[str, Any]) -> dict:
        failed = batchdata.get("failed", []) if isinstance(batchdata, dict) else []
        for message in failed:
            logger.error("skipped: %s", message)
        engine.failures.extend(failed)
        whole_slides = batchdata.get("whole_slide", []) if isinstance(batchdata, dict) else []
        outputs = [output for output in map(engine._segment_whole_slide, whole_slides) if output is not None]
        if Keys.IMAGE not in batchdata:
            engine.state.output = outputs or {}
            return engine.state.output
        output = super()._iteration(engine, batchdata)
        if outputs:
            engine.state.output = [*outputs, *(output if isinstance(output, list) else [output])]
        return engine.state.output

    def _segment_whole_slide(self, path: str) -> dict | None:
        """Segment one whole-slide image; None (and the failure recorded) when it cannot be read."""
        if self.whole_slide is None:
            raise RuntimeError(f"{path} was set aside for whole-slide mode but FolderEvaluator has no whole_slide")
        # the inferer carries the bundles' amp setting (common.precision); this is MONAI's own CUDA switch
        engine_autocast = torch.autocast("cuda", **self.amp_kwargs) if self.amp else contextlib.nullcontext()
        try:
            with self.mode(self.network), engine_autocast:
                labels = self.whole_slide.segment(path, self.inferer, self.network, self.state.device)
        except Exception as error:
            cause = unreadable_input_cause(error)
            if cause is None:
                raise
            message = failure_message(path, cause)
            logger.error("skipped: %s", message)
            self.failures.append(message)
            return None
        named = MetaTensor(torch.zeros(0), meta={"filename_or_obj": str(path)})
        return {Keys.PRED: torch.from_numpy(labels)[None], Keys.IMAGE: named}

    def run(self, global_epoch: int = 1) -> None:
        if self.state.epoch_length == 0:  # MONAI skips an empty loader without firing COMPLETED
            self._raise_on_failures(self)
            return
        super().run(global_epoch)

    def _raise_on_failures(self, engine: FolderEvaluator) -> None:
        failures = gather_lists(engine.failures)
        if not failures:
            return
        rank, _ = rank_and_world_size()
        if rank != 0:  # rank 0 names them: each bad file is named once, whatever the number of processes
            raise RuntimeError(f"{len(failures)} image(s) could not be segmented; rank 0 names them")
        raise RuntimeError(f"{len(failures)} image(s) could not be segmented: " + "; ".join(failures))
