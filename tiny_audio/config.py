"""Typed experiment configuration: YAML file + `section.key=value` overrides, validated at start-up.

The defaults below are the ONE place shared settings live (the real GLM-ASR-Nano + Qwen3 setup the
course trains); each `configs/experiments/<name>.yaml` states only what differs from them.

Every mistake a user can make here (unknown key, wrong type, impossible value) raises `ConfigError`
with one line naming the key, the file it came from and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tiny_audio.assets import SCHEME as ASSET_SCHEME


def _config_dir() -> Path:
    """The experiment and DeepSpeed configs: inside the package when installed from a wheel (tiny_audio/configs),
    in the repository's top-level configs/ for a checkout or an editable install (the image's)."""
    package = Path(__file__).resolve().parent
    shipped = package / "configs"
    return shipped if (shipped / "experiments").is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()
EXPERIMENTS_DIR = CONFIG_DIR / "experiments"
DEEPSPEED_DIR = CONFIG_DIR / "deepspeed"


# How the frozen parts are stored and whether forwards run under bf16 autocast (tiny_audio.precision).
PrecisionSetting = Literal["auto", "bf16-mixed", "bf16-frozen", "fp32-mixed", "fp32"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    encoder_id: str = "zai-org/GLM-ASR-Nano-2512"
    """Audio encoder: a Hub repo id, a local directory, or `asset://<name>` for a model shipped in the package."""
    encoder_revision: str | None = None
    """Hub revision (branch, tag or commit) of the encoder; pin one for reproducible runs."""
    encoder_type: Literal["glmasr", "whisper"] = "glmasr"
    """Which encoder family `encoder_id` holds; only its audio tower is loaded."""
    decoder_id: str = "Qwen/Qwen3-0.6B"
    """Causal LM decoder (any AutoModelForCausalLM): Hub repo id, local directory or `asset://<name>`."""
    decoder_revision: str | None = None
    """Hub revision of the decoder."""
    encoder_padding: Literal["batch", "window"] = "batch"
    """How clips reach the encoder. batch: padded to the batch's longest clip, padding masked out (about 3x
    cheaper on LoquaciousSet's lengths). window: every clip padded to the 30 s window with no mask, exactly as
    GLM-ASR's own processor feeds its tower (`tiny-audio compare-padding` prints how far apart the two are)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel for encoder and decoder (flash_attention_2 needs a CUDA GPU and the flash-attn package)."""
    instruction: str = "Transcribe the audio."
    """The user-turn instruction placed before the audio in the chat template."""
    audio_token: str = "<audio>"
    """Placeholder token added to the tokenizer; replaced by projected audio embeddings."""


# The settings each projector type reads, besides `type` and `match_embedding_rms` (every type reads those). The
# registry passes exactly these to the projector's class; a setting that the chosen type does not read is refused
# when set, so an experiment file never carries a value that silently does nothing.
PROJECTOR_SETTINGS: dict[str, tuple[str, ...]] = {
    "mlp": ("stack", "hidden_dim", "dropout"),
    "mosa": ("stack", "hidden_dim", "num_experts", "router_hidden_dim", "dropout"),
    "moe": ("stack", "hidden_dim", "num_experts", "top_k", "aux_loss_coef", "z_loss_coef", "dropout"),
}


class ProjectorConfig(Section):
    type: Literal["mlp", "mosa", "moe"] = "mlp"
    """Projector architecture: mlp (stack + 2-layer MLP), mosa (dense mixture of adapters, MOSA-Base), moe (temporal
    convolution, then a shared expert + sigmoid-routed top-k experts)."""
    stack: int = Field(4, ge=1, le=16)
    """Consecutive encoder frames stacked into one decoder token (4: 50 Hz -> 12.5 Hz)."""
    hidden_dim: int | None = Field(None, ge=1)
    """Hidden width of the mlp / of each expert. None: the course's for the type: mlp 2048 (~12.6M parameters for
    1280 -> 1024), mosa 4096, moe stack x encoder width (5120 for GLM-ASR)."""
    num_experts: int = Field(4, ge=1, le=64)
    """Adapters in mosa / routed experts in moe, besides its shared one."""
    router_hidden_dim: int = Field(512, ge=1)
    """Hidden width of mosa's two-layer ReLU router, which reads each token's frames mean-pooled (mosa only)."""
    top_k: int = Field(2, ge=1)
    """Routed experts per token (moe only)."""
    aux_loss_coef: float = Field(0.02, ge=0)
    """Weight of the load-balancing loss (moe only)."""
    z_loss_coef: float = Field(0.001, ge=0)
    """Weight of the router z-loss (moe only)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the projector MLPs."""
    match_embedding_rms: bool = False
    """RMS-normalise each output token and scale it to the RMS of the decoder's token embeddings (a learnable gain).
    Off, as in the course's projectors, because it does not help: trained both ways, the miniature run learned
    faster without it and ended at a lower loss (figures in the README)."""

    @field_validator("*")
    @classmethod
    def _read_by_the_type(cls, value: Any, info: ValidationInfo) -> Any:
        kind, name = info.data.get("type"), info.field_name
        if kind is None or name in ("type", "match_embedding_rms") or name in PROJECTOR_SETTINGS[kind]:
            return value
        readers = " and ".join(k for k, names in PROJECTOR_SETTINGS.items() if name in names)
        raise PydanticCustomError(
            "not_read_by_type",
            "not read by the {kind} projector (only by {readers}): remove it or change projector.type",
            {"kind": kind, "readers": readers},
        )

    @model_serializer(mode="wrap")
    def _only_what_the_type_reads(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Saved and printed configs hold the settings of their type only, so they load again as they are."""
        keep = {"type", "match_embedding_rms", *PROJECTOR_SETTINGS[self.type]}
        return {key: value for key, value in handler(self).items() if key in keep}

    @field_validator("top_k")
    @classmethod
    def _top_k_fits(cls, value: int, info: ValidationInfo) -> int:
        experts = info.data.get("num_experts")
        if experts is not None and value > experts:
            raise PydanticCustomError(
                "top_k_too_large", "must be <= projector.num_experts ({experts})", {"experts": experts}
            )
        return value


class SourceConfig(Section):
    path: str
    """Hub data set id (`speechbrain/LoquaciousSet`), a local folder, or a builder name (`parquet`) with data_files."""
    name: str | None = None
    """Data set configuration name (e.g. `small`)."""
    split: str = "train"
    """Split to stream."""
    data_files: list[str] | None = None
    """Files or glob patterns: local, hf://, or asset://<name> for data shipped in the package; relative paths
    resolve against the experiment file's folder."""
    revision: str | None = None
    """Hub revision of the data set."""
    audio_column: str = "audio"
    """Column holding the audio (an Audio feature or {bytes, path})."""
    text_column: str = "text"
    """Column holding the transcript."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight when several sources are interleaved."""
    strip_patterns: list[str] = Field(default_factory=lambda: [r"<[^>]*>", r"\[[^\]]*\]"])
    """Regular expressions removed from transcripts (corpus markers such as <unk>, [noise])."""
    lowercase: bool = False
    """Lower-case transcripts of this source."""


class SpecAugmentConfig(Section):
    enabled: bool = True
    """Mask random stretches of time and bands of frequency in the log-mel features while training (never in
    evaluation or generation), as the course's trainer does."""
    time_masks: int = Field(2, ge=0)
    """Time masks per clip."""
    time_mask_frames: int = Field(100, ge=0)
    """Longest time mask, in 10 ms frames (100: one second)."""
    freq_masks: int = Field(2, ge=0)
    """Frequency masks per clip."""
    freq_mask_bins: int = Field(27, ge=0)
    """Widest frequency mask, in mel bins (of 128)."""


class DataConfig(Section):
    train: list[SourceConfig] = Field(
        default_factory=lambda: [
            SourceConfig(
                path="speechbrain/LoquaciousSet", name="medium", split="train", audio_column="wav", lowercase=True
            )
        ]
    )
    """Training sources, interleaved by weight."""
    eval: SourceConfig | None = Field(
        default_factory=lambda: SourceConfig(
            path="speechbrain/LoquaciousSet", name="medium", split="dev", audio_column="wav", lowercase=True
        )
    )
    """Held-out source for eval loss and WER (None disables evaluation)."""
    eval_samples: int = Field(2000, ge=1)
    """Held-out samples scored (loss) at every evaluation: a seeded sample drawn once from the whole eval split."""
    eval_wer_samples: int = Field(500, ge=0)
    """Of those, a seeded subset greedily transcribed for WER at every evaluation (0: loss only)."""
    eval_scan_rows: int = Field(50_000, ge=1)
    """Rows of the eval split read to draw the sample from, round-robin over its shards (a dev split is read
    whole; a huge one is sampled from its first rows of every shard)."""
    eval_seed: int = 0
    """Seed of the eval sample: the same held-out set for every run whatever training.seed is."""
    max_new_tokens: int = Field(256, ge=1)
    """Longest transcript generated for WER and `transcribe` (the course's 256)."""
    min_seconds: float = Field(0.3, ge=0)
    """Clips shorter than this are dropped."""
    max_seconds: float = Field(30.0, gt=0, le=30.0)
    """Clips longer than this are dropped (never truncated); the encoder's window is 30 s."""
    max_label_tokens: int = Field(256, ge=1)
    """Transcripts with more tokens than this are dropped."""
    silence_rms: float = Field(1e-4, ge=0)
    """Clips whose RMS is below this are dropped as silence."""
    shuffle: bool = True
    """Seeded shuffling (shard order + permutation within blocks); resume stays exact."""
    shuffle_block_rows: int = Field(1000, ge=1)
    """Rows read whole and permuted together."""
    bucket_batches: int = Field(32, ge=1)
    """Batches formed together by sorting on duration (length bucketing); 1 disables bucketing."""
    num_workers: int = Field(4, ge=0)
    """Threads decoding and resampling audio ahead of the training step."""
    prefetch_batches: int = Field(8, ge=1)
    """Batches decoded ahead of the step."""
    spec_augment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    """SpecAugment on the training features (the course's 2 time masks of up to 100 frames, 2 frequency masks of
    up to 27 bins); the masks come from the run's seeded RNG, so a resumed run draws the same ones."""


class TrainingConfig(Section):
    hub_model_id: str | None = None
    """Where checkpoints go: `user/name` (a Hub model repo) or `file:///abs/path`; None keeps them in OUTPUT_DIR."""
    max_steps: int = Field(20_000, ge=1)
    """Optimizer steps to train (the course's 20,000)."""
    batch_size: int = Field(16, ge=1)
    """Samples per device per micro-batch (the course's 16; halve it when a GPU runs out of memory)."""
    global_batch_size: int | None = Field(32, ge=1)
    """Samples per optimizer step over all devices, the course's 32: accumulation adapts to the processes
    (16 x 2 on one GPU, 16 x 1 on two). None: batch_size x processes, one micro-batch per step."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW (the course's training default)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay (the course's 0.01)."""
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.95, gt=0, lt=1)
    """AdamW's second-moment decay (the course's 0.95: it adapts faster than 0.999 to the loss's sudden drop)."""
    warmup_steps: int = Field(1000, ge=0)
    """Linear warm-up steps before the schedule (the course's 1,000)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    logging_steps: int = Field(25, ge=1)
    """Steps between console/tracker lines."""
    eval_steps: int = Field(1000, ge=1)
    """Steps between evaluations on the held-out set."""
    eval_at_start: bool = False
    """Also evaluate before the first step of a fresh run: the untrained baseline (WER ~100%) on the curves."""
    save_steps: int = Field(1000, ge=1)
    """Steps between checkpoints."""
    keep_checkpoints: int = Field(2, ge=1)
    """Local checkpoints kept in OUTPUT_DIR."""
    max_bad_steps: int = Field(10, ge=1)
    """Consecutive non-finite losses/gradients tolerated before the run stops."""
    seed: int = 42
    """Seed for weights, data order and everything random."""
    resume: bool = True
    """Continue from the latest checkpoint in the store when there is one; false starts fresh."""
    init_from: str | None = None
    """A finished checkpoint a FRESH run starts from: its projector (and its LoRA adapters, when it has them and
    lora.enabled is set) are loaded before the first step. A local step-N folder or a Hub repo; e.g. the course's
    second stage (`mlp-lora`) starts from the projector its first stage trained."""
    precision: PrecisionSetting = "auto"
    """Number formats (the projector's weights are fp32 in every case): bf16-mixed (frozen parts bf16, forwards
    under bf16 autocast), bf16-frozen (frozen parts bf16, projector computing in fp32), fp32-mixed (everything
    fp32, bf16 autocast), fp32 (no autocast). auto: bf16-mixed on CUDA, fp32 on CPU."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the projector and the decoder's body (dynamic shapes; kernels cached on the volume). auto: on
    with a GPU, off on CPU (compiling a CPU run costs more than it saves). A failed compile falls back to eager."""
    deepspeed: str | None = None
    """DeepSpeed ZeRO: zero1, zero2, zero3 (configs/deepspeed/<name>.json) or a path to a JSON config; None: DDP."""

    @model_validator(mode="after")
    def _deepspeed_known(self) -> TrainingConfig:
        name = self.deepspeed
        if name is not None and not (DEEPSPEED_DIR / f"{name}.json").is_file() and not name.endswith(".json"):
            known = ", ".join(sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")))
            raise ValueError(f"training.deepspeed must be one of {known} or a path to a .json file, got {name!r}")
        return self


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters on the decoder together with the projector (the course's second stage, `mlp-lora`)."""
    rank: int = Field(32, ge=1)
    """Rank of each adapter's low-rank update (the course's 32)."""
    alpha: float = Field(64, gt=0)
    """LoRA's scale numerator: updates are scaled by alpha / rank (the course's 64)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the adapters' input while training (the course's 0.1)."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """The decoder's projections that get adapters: Qwen3's attention and MLP projections, as the course does."""


class HubConfig(Section):
    private: bool = True
    """Create the checkpoint repo as private."""
    revision: str = "main"
    """Branch checkpoints are committed to."""
    min_upload_interval_s: float = Field(60.0, ge=0)
    """Minimum seconds between two commits (the Hub allows ~128 commits per hour per repo)."""
    flush_timeout_s: float = Field(600.0, ge=0)
    """Longest wait for pending uploads at the end of training or on a stop signal."""
    retry_attempts: int = Field(6, ge=1)
    """Tries per Hub call (uploads, downloads) on 429, 5xx, timeouts and dropped connections."""
    retry_initial_s: float = Field(2.0, ge=0)
    """First retry waits up to this long; each further one up to twice as long (random: full jitter)."""
    retry_max_s: float = Field(60.0, ge=0)
    """Longest wait between two tries."""


class TrackingConfig(Section):
    backend: Literal["wandb", "none"] = "wandb"
    """Experiment tracker."""
    project: str = "tiny-audio"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None uses the key's default."""
    run_name: str | None = None
    """Run name; defaults to the experiment name."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when WANDB_API_KEY is set, offline otherwise (never prompts)."""


class BudgetConfig(Section):
    """What the run costs and when it has cost enough. Time counts wall-clock from the container's start (model
    downloads and evaluations included) and adds up over restarts; the environment variables override."""

    cost_per_hour: float | None = Field(None, ge=0)
    """USD per hour of this machine (env COST_PER_HOUR). None: read once from the pod on RunPod, else no costs."""
    max_hours: float | None = Field(None, gt=0)
    """Hours after which the run saves, uploads and ends as done, then ON_FINISH (env MAX_HOURS). None: no limit."""
    max_cost_usd: float | None = Field(None, gt=0)
    """USD after which the run saves, uploads and ends as done, then ON_FINISH (env MAX_COST_USD); needs a price."""


class HealthConfig(Section):
    """When to think about cancelling: warnings (log line + W&B alert) about the eval loss's trend."""

    plateau_steps: int = Field(3000, ge=1)
    """Warn when the eval loss has not fallen by min_improvement within this many steps (past the usual plateau)."""
    min_improvement: float = Field(0.01, ge=0, lt=1)
    """The fall of the best eval loss that counts as progress, as a fraction of it (0.01: 1%)."""
    rising_evals: int = Field(3, ge=1)
    """Warn when the eval loss rises this many evaluations in a row while the training loss falls."""
    stop_on_warning: bool = False
    """End the run at a warning (save, upload, ON_FINISH) instead of only warning."""


class Config(Section):
    experiment: str = "mlp"
    """Experiment name (set from the file name)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def is_miniature(self) -> bool:
        """Both models ship inside the package (`asset://`): miniatures made to train on a CPU."""
        return all(ref.startswith(ASSET_SCHEME) for ref in (self.model.encoder_id, self.model.decoder_id))
