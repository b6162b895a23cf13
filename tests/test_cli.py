"""The command line as a user meets it: mistakes end in one line and exit 2 before any download; `check` prints
the real plan offline; base models come from a Hub (the local test server) through the production loading path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from click.testing import CliRunner

from tests.hub_server import HubServer
from tiny_audio import hub
from tiny_audio.cli import app
from tiny_audio.errors import UserError
from tiny_audio.experiments import load_config
from tiny_audio.model.encoder import TOWER_PREFIXES
from tiny_audio.model.loading import build_model, resolve_model_path
from tiny_audio.preflight import preflight

pytestmark = pytest.mark.usefixtures("restore_logging")  # commands configure logging (conftest.py)
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_cliTestTokenValue0123456789abcdef"


def invoke(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
    runner = CliRunner()
    base = {"EXP": None, "HF_TOKEN": None, "HUB_MODEL_ID": None, "OUTPUT_DIR": None}
    if cwd is None:
        return runner.invoke(app, args, env={**base, **(env or {})}, prog_name="tiny-audio")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, args, env={**base, **(env or {})}, prog_name="tiny-audio")
    finally:
        os.chdir(old)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1, lines  # one line, no traceback
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_experiment_exits_2_naming_those_that_exist() -> None:
    line = one_error_line(invoke([], env={"EXP": "nope"}))
    assert "'nope'" in line
    for name in ("mlp", "mosa", "moe", "tiny"):
        assert name in line


def test_missing_experiment_says_how_to_set_it() -> None:
    line = one_error_line(invoke(["train"]))
    assert "EXP" in line and "mlp" in line


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("training.bogus=1", "training.bogus"),
        ("training.max_steps=abc", "training.max_steps"),
        ("projector.type=transformer", "projector.type"),
        ("nosection", "nosection"),
    ],
)
def test_a_bad_override_is_one_line_naming_the_key(override: str, named: str) -> None:
    line = one_error_line(invoke(["check", override], env={"EXP": "mlp"}))
    assert named in line


def test_pushing_to_the_hub_without_a_token_stops_before_any_download(tmp_path: Path) -> None:
    # the models named here do not exist anywhere: reaching a download would fail differently
    result = invoke(
        ["train", "training.hub_model_id=me/run", "model.decoder_id=nobody/none"],
        env={"EXP": "mlp", "OUTPUT_DIR": str(tmp_path)},
    )
    line = one_error_line(result)
    assert "HF_TOKEN" in line and "me/run" in line
    assert not any(tmp_path.iterdir())


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("EXP=from_dotenv\n")
    line = one_error_line(invoke(["check"], cwd=tmp_path))
    assert "'from_dotenv'" in line


def test_check_prints_the_real_plan_offline(tmp_path: Path) -> None:
    result = invoke(["check"], env={"EXP": "mlp", "OUTPUT_DIR": str(tmp_path / "out")})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "zai-org/GLM-ASR-Nano-2512" in out
    assert "Qwen/Qwen3-0.6B" in out
    assert "projector:  mlp" in out
    # ~12.6M trainable parameters at the real widths (1280 x 4 -> 2048 -> 1024)
    assert "12,585,984 trainable parameters" in out
    assert "not checked" in out  # offline: says which checks it could not make
    assert not (tmp_path / "out").exists()  # check writes nothing
    # the course's recipe, as it would run on this machine's one process
    assert "global batch 32 = 16/device x 2 accumulation x 1 process(es)" in out
    assert "AdamW lr 1.0e-04 (betas 0.9/0.95, weight decay 0.01), 1000 warm-up steps then cosine, clip 1" in out
    assert "eval every 1000 steps on 2000 held-out samples (WER on 500, up to 256 new tokens)" in out
    # no GPU here: the config is fine, but training would be refused, and check says so instead of "ready"
    assert out.strip().splitlines()[-1].startswith("result: the config is ready, but training would be refused")


def test_check_says_a_miniature_or_allow_cpu_trains_here(tmp_path: Path) -> None:
    mini = invoke(["check"], env={"EXP": "mini", "OUTPUT_DIR": str(tmp_path / "a")})
    assert mini.exit_code == 0 and mini.stdout.strip().endswith("result: ready")
    allowed = invoke(["check"], env={"EXP": "mlp", "ALLOW_CPU": "1", "OUTPUT_DIR": str(tmp_path / "b")})
    assert allowed.exit_code == 0 and allowed.stdout.strip().endswith("result: ready")
    assert "ALLOW_CPU=1, so it would train on CPU" in allowed.stdout


def test_help_documents_every_environment_variable() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    for name in ("EXP", "HF_TOKEN", "HUB_MODEL_ID", "OUTPUT_DIR", "WANDB_API_KEY", "HF_HOME", "ON_FINISH"):
        assert name in result.output
    assert "143" in result.output  # the exit code after a signal
    assert "#environment-variables" in result.output  # the one table, in the README
    assert "## Environment variables" in (ROOT / "README.md").read_text()


def test_entrypoint_and_console_script_are_the_same_app() -> None:
    env = {**os.environ, "EXP": "nope"}
    script = Path(sys.executable).parent / "tiny-audio"
    answers = []
    for command in ([sys.executable, str(ROOT / "entrypoint.py")], [str(script)]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        answers.append(done.stderr.strip().splitlines())
    assert answers[0] == answers[1]
    assert len(answers[0]) == 1 and answers[0][0].startswith("error: unknown experiment 'nope': choose one of ")


# --- base models on a Hub -------------------------------------------------------------------------------


@pytest.fixture
def model_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dirs: tuple[Path, Path]
) -> Iterator[HubServer]:
    """A local Hub holding the tiny encoder and decoder as `org/encoder` and `org/decoder`, an empty HF cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    with HubServer(token=TOKEN) as server:
        # what HF_ENDPOINT=<server> does when huggingface_hub is imported
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        for name, folder in zip(("org/encoder", "org/decoder"), tiny_model_dirs, strict=True):
            repo = hub.HubRepo(name, token=TOKEN, endpoint=server.endpoint)
            repo.ensure_exists(private=False)
            repo.upload_folder(folder, message="model")
        yield server


def test_base_models_download_from_the_hub_and_load_through_the_production_path(model_hub: HubServer) -> None:
    cfg = load_config("tiny", ["model.encoder_id=org/encoder", "model.decoder_id=org/decoder"])
    model = build_model(cfg, device="cpu", frozen_dtype=torch.float32, token=TOKEN)
    assert model.encoder.hidden_size == 32
    # cached once: offline afterwards, the same snapshot is used without asking the Hub
    first = resolve_model_path("org/decoder", revision=None, token=TOKEN)
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    assert resolve_model_path("org/decoder", revision=None, token=TOKEN) == first


def test_only_the_encoders_tower_is_fetched_and_it_equals_the_full_checkpoints(
    model_hub: HubServer, tiny_model_dirs: tuple[Path, Path]
) -> None:
    from safetensors import safe_open

    from tiny_audio.model.encoder import load_encoder

    full = tiny_model_dirs[0] / "model.safetensors"
    with safe_open(str(full), "pt") as f:
        names = list(f.keys())
    part = resolve_model_path("org/encoder", revision=None, token=TOKEN, only=TOWER_PREFIXES["glmasr"])
    with safe_open(str(part / "model.safetensors"), "pt") as f:
        fetched = list(f.keys())
    tower = [n for n in names if n.startswith(TOWER_PREFIXES["glmasr"])]
    assert set(tower) <= set(fetched) < set(names)  # the LLM beside the tower stays on the Hub
    assert (part / "model.safetensors").stat().st_size < full.stat().st_size
    assert (part / "preprocessor_config.json").is_file()

    features = torch.randn(1, 128, 40)
    lengths = torch.tensor([40])
    ours, _ = load_encoder(part)
    reference, _ = load_encoder(tiny_model_dirs[0])
    torch.testing.assert_close(ours(features, lengths)[0], reference(features, lengths)[0], rtol=0, atol=0)
    # cached per commit: asking again fetches nothing
    served = model_hub.bytes_served
    assert 0 < served < full.stat().st_size
    assert resolve_model_path("org/encoder", revision=None, token=TOKEN, only=TOWER_PREFIXES["glmasr"]) == part
    assert model_hub.bytes_served == served


def test_a_model_that_does_not_exist_is_one_line(model_hub: HubServer) -> None:
    with pytest.raises(UserError, match="org/absent does not exist or is private"):
        hub.download_model("org/absent", revision=None, token=TOKEN)


def test_an_uncached_model_offline_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match=r"not in the local cache .* HF_HUB_OFFLINE"):
        hub.download_model("org/anything", revision=None, token=None)


def test_check_confirms_models_on_the_hub_and_names_the_missing_one(model_hub: HubServer, tmp_path: Path) -> None:
    cfg = load_config("tiny", ["model.encoder_id=org/encoder", "model.decoder_id=org/not-there"])
    report = preflight(cfg, token=TOKEN, target="me/new-run", output_dir=tmp_path)
    text = report.render()
    assert "reachable: model org/encoder" in text
    assert "me/new-run will be created at the first checkpoint" in text
    assert report.problems == ["model org/not-there does not exist on the Hub (check the id)"]
    assert hub.check_access("org/decoder", repo_type="model", token=TOKEN) == "ok"
    hub.HubRepo("org/private", token=TOKEN).ensure_exists(private=True)
    assert hub.check_access("org/private", repo_type="model", token=TOKEN) == "ok"
    assert hub.check_access("org/private", repo_type="model", token=None) == "missing"  # invisible without it


def test_library_warnings_pass_the_secret_filter_too(capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    import datasets  # noqa: F401  (libraries install their own handlers on import)

    from tiny_audio.cli import setup_logging

    setup_logging(secrets=[TOKEN])
    for name in ("tiny_audio.train", "huggingface_hub.file_download", "datasets.load", "urllib3.connectionpool"):
        logging.getLogger(name).warning("request with %s failed", TOKEN)
    out, err = capfd.readouterr()
    assert TOKEN not in out + err
    assert (out + err).count("<redacted>") == 4


def test_check_names_online_tracking_without_a_key_as_a_problem(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    result = invoke(["check", "tracking.mode=online"], env={"EXP": "mlp", "OUTPUT_DIR": str(tmp_path / "out")})
    assert result.exit_code == 2
    assert "WANDB_API_KEY" in result.stderr


def test_check_names_the_second_stage(tmp_path: Path) -> None:
    result = invoke(["check", "training.init_from=me/stage-one"], env={"EXP": "mlp-lora", "OUTPUT_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "lora:       rank 32, alpha 64, dropout 0.1 on q_proj, k_proj, v_proj, o_proj" in result.stdout
    assert "starts from: me/stage-one" in result.stdout
