"""Typed experiment configuration: YAML file + `section.key=value` overrides, validated at start-up.

The defaults below are the ONE place shared settings live (the real GLM-ASR-Nano + Qwen3 setup the
course trains); each `configs/experiments/<name>.yaml` states only what differs from them.

Every mistake a user can make here (unknown key, wrong type, impossible value) raises `ConfigError`
with one line naming the key, the file it came from and what is allowed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tiny_audio.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS_DIR = CONFIG_DIR / "experiments"
DEEPSPEED_DIR = CONFIG_DIR / "deepspeed"


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
    """Files or glob patterns (local or hf://); relative paths resolve against the experiment file's folder."""
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
    eval_samples: int = Field(200, ge=1)
    """Fixed number of held-out samples used at every evaluation."""
    eval_wer_samples: int = Field(64, ge=0)
    """Held-out samples greedily transcribed for WER at every evaluation (0: loss only)."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest transcript generated for WER and `transcribe`."""
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


class TrainingConfig(Section):
    hub_model_id: str | None = None
    """Where checkpoints go: `user/name` (a Hub model repo) or `file:///abs/path`; None keeps them in OUTPUT_DIR."""
    max_steps: int = Field(20_000, ge=1)
    """Optimizer steps to train."""
    batch_size: int = Field(8, ge=1)
    """Samples per device per micro-batch."""
    global_batch_size: int | None = Field(None, ge=1)
    """Samples per optimizer step over all devices; accumulation adapts. None: batch_size x processes."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    warmup_steps: int = Field(500, ge=0)
    """Linear warm-up steps before the schedule."""
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
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU. The projector's weights stay fp32 either way."""
    compile: bool = False
    """torch.compile the projector and decoder (CUDA)."""
    deepspeed: str | None = None
    """DeepSpeed ZeRO: zero1, zero2, zero3 (configs/deepspeed/<name>.json) or a path to a JSON config; None: DDP."""

    @model_validator(mode="after")
    def _deepspeed_known(self) -> TrainingConfig:
        name = self.deepspeed
        if name is not None and not (DEEPSPEED_DIR / f"{name}.json").is_file() and not name.endswith(".json"):
            known = ", ".join(sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")))
            raise ValueError(f"training.deepspeed must be one of {known} or a path to a .json file, got {name!r}")
        return self


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


class Config(Section):
    experiment: str = "mlp"
    """Experiment name (set from the file name)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def experiment_path(experiment: str) -> Path:
    """An experiment name (`mlp`) or a path to a YAML file -> the YAML file."""
    candidate = Path(experiment)
    if candidate.suffix in (".yaml", ".yml") or os.sep in experiment:
        if not candidate.is_file():
            raise ConfigError(f"experiment file {experiment} does not exist")
        return candidate.resolve()
    path = EXPERIMENTS_DIR / f"{experiment}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown experiment '{experiment}': choose one of {', '.join(available_experiments())} "
            f"or give a path to a YAML file"
        )
    return path


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=3e-4` -> (["training", "learning_rate"], 3e-4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; a number is what anyone typing it means.
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], keys: list[str], value: Any, source: str) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])} is not a section (in {source})")
        node = child
    node[keys[-1]] = value


def _format_error(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_for(error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        return f"unknown key '{key}' in {source}; allowed here: {allowed}"
    message = error["msg"]
    if kind == "literal_error":
        message = message.replace("Input should be", "must be")
    return f"{key}: {message} (got {error.get('input')!r}, in {source})"


def _section_for(loc: tuple[Any, ...]) -> type[Section] | None:
    """The config section class at a validation error's location (to list the keys allowed there)."""
    section: type[Section] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = section.model_fields.get(str(part))
        found = _find_section(field.annotation) if field else None
        if found is None:
            return None
        section = found
    return section


def _find_section(annotation: Any) -> type[Section] | None:
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _find_section(arg)
        if found is not None:
            return found
    return None


def load_config(experiment: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve an experiment name or YAML path, apply `section.key=value` overrides, validate everything."""
    path = experiment_path(experiment)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, projector, data, ...)")
    raw.setdefault("experiment", path.stem)
    _resolve_relative_files(raw, path.parent)
    source = str(path)
    problems: list[str] = []
    try:
        Config.model_validate(raw)
    except ValidationError as exc:
        problems += [_format_error(e, source) for e in exc.errors()]
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(raw, keys, value, f"override '{text}'")
    if overrides and not problems:
        try:
            return Config.model_validate(raw)
        except ValidationError as exc:
            problems += [_format_error(e, "the command-line overrides") for e in exc.errors()]
    if problems:
        raise ConfigError("; ".join(problems))
    return Config.model_validate(raw)


def _resolve_relative_files(raw: dict[str, Any], base: Path) -> None:
    """data_files given relative to the experiment file are made absolute, so a copied YAML keeps working."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    sources = [*list(data.get("train") or []), data.get("eval")]
    for source in sources:
        if not isinstance(source, dict):
            continue
        files = source.get("data_files")
        if isinstance(files, list):
            source["data_files"] = [_absolute(f, base) for f in files]
        path = source.get("path")
        if isinstance(path, str) and path.startswith(("./", "../")):
            source["path"] = str((base / path).resolve())


def _absolute(file: Any, base: Path) -> Any:
    if not isinstance(file, str) or "://" in file or os.path.isabs(file):
        return file
    return str((base / file).resolve())
