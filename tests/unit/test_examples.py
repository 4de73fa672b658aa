"""examples/: every recipe's config loads, its script is valid bash, and each runs end to end at the tiny scale.

The scripts are run as a user runs them (`bash examples/<name>/run.sh --set ...`), with `--set` overrides that
shrink the model and data to the tiny preset; everything else (the commands, their order, the config file) is
the recipe's own. LONGLIVE points at this checkout's CLI; TORCHRUN_ARGS gives torchrun a free port.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longlive.config import load_config
from megatron_longlive.distributed.launch import free_port
from megatron_longlive.inference.video_writer import read_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
RECIPES = ("quickstart", "wan2.1-ar-balanced-sp", "wan2.2-5b-nvfp4", "lora-dmd", "sp-inference", "multishot")
# the tiny scale: 32x32 pixels (4x4 latents), 13 frames (4 latent frames, chunks of 1), random tiny encoders
TINY_MODEL = ["model.preset=tiny", 'train.init_from=""', "train.precision=fp32", "train.chunk_frames=1",
              "train.activation_checkpointing=false", "train.wandb_mode=disabled", "train.max_steps=2",
              "train.save_interval=2", "train.warmup_steps=1"]
TINY_DATA = ["data.height=32", "data.width=32", "data.num_frames=13", "data.fps=8.0", "data.num_videos=2",
             "data.num_shots=2"]
TINY_INFER = ["infer.height=32", "infer.width=32", "infer.chunk_frames=1", "infer.window_frames=4",
              "infer.sink_frames=1", "infer.shot_sink_frames=1", "infer.num_chunks=4", "infer.denoising_steps=[1000]",
              'infer.vae_path=""', 'infer.text_encoder_path=""']


def _sets(*groups: list[str]) -> list[str]:
    out = []
    for group in groups:
        for item in group:
            out += ["--set", item]
    return out


def run_recipe(name: str, cwd, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """`bash examples/NAME/run.sh ARGS` with this checkout's CLI and interpreter; asserts success."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    full_env = dict(os.environ, PATH=path, PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
                    LONGLIVE=f"{sys.executable} -m megatron_longlive.cli.main",
                    TORCHRUN_ARGS=f"--master-port {free_port()}")
    full_env.update(env)
    r = subprocess.run(["bash", os.path.join(EXAMPLES, name, "run.sh"), *args], cwd=str(cwd), env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _synthetic_videos(folder) -> str:
    from dataloaders.synthetic import generate_dataset
    from megatron_longlive.config import DataConfig

    generate_dataset(str(folder), DataConfig(height=32, width=32, num_frames=13, num_shots=2, fps=8.0, seed=3),
                     num_videos=2, progress=False)
    return str(folder)


# ----- static checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_has_config_script_and_readme_section(name):
    cfg = load_config(os.path.join(EXAMPLES, name, "config.yaml"))
    assert cfg.model.num_heads % (cfg.parallel.sp_size * cfg.parallel.tp_size) == 0
    assert cfg.infer.window_frames % cfg.infer.chunk_frames == 0
    script = os.path.join(EXAMPLES, name, "run.sh")
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", script], check=True)
    readme = open(os.path.join(EXAMPLES, "README.md")).read()
    assert f"examples/{name}/run.sh" in readme, f"examples/README.md has no section running {name}"


def test_sp_inference_recipe_splits_whole_chunks():
    """SP inference needs the chunk's tokens divisible by the ranks (no padding)."""
    cfg = load_config(os.path.join(EXAMPLES, "sp-inference", "config.yaml"))
    stride = 8 * 2  # Wan2.1 VAE x patch
    tokens = cfg.infer.chunk_frames * (cfg.infer.height // stride) * (cfg.infer.width // stride)
    assert tokens % cfg.parallel.sp_size == 0


# ----- commands quoted in the docs parse -----------------------------------------------------------------
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "guides", "*.md"))) + [
    os.path.join(ROOT, "docs", "numbers.md"), os.path.join(ROOT, "slurm", "README.md"),
    os.path.join(EXAMPLES, "README.md")]


def quoted_commands(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """(commands of fenced code blocks, commands of inline `code` spans) that start with longlive / torchrun /
    python -m tools.*, split like the shell splits them (comments dropped, backslash-newlines joined)."""
    def wanted(argv):
        if argv and argv[0] in ("longlive", "torchrun"):
            return True
        return len(argv) > 2 and argv[:2] == ["python", "-m"] and argv[2].startswith("tools.")

    fenced = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if wanted(argv):
                fenced.append(argv)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    inline = [shlex.split(span.replace("\n", " ")) for span in re.findall(r"`([^`]+)`", prose)]
    return fenced, [argv for argv in inline if wanted(argv)]


def parse_command(argv: list[str]) -> None:
    """Parse (never run) a quoted command with the parser that would read it; SystemExit means a bad command."""
    from megatron_longlive.cli.main import build_parser

    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])
        assert args.module and args.training_script == "megatron_longlive.cli.main", argv
        argv = ["longlive", *args.training_script_args]
    if argv[0] == "longlive":
        build_parser().parse_args(argv[1:])
    else:
        from tools._cli import build_parser as tool_parser

        module = importlib.import_module(argv[2])
        tool_parser(argv[2].split(".")[1], module.__doc__, module.add_arguments).parse_args(argv[3:])


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_commands_quoted_in_docs_parse(path):
    from megatron_longlive.cli.main import SUBCOMMANDS

    fenced, inline = quoted_commands(open(path).read())
    for argv in fenced:
        try:
            parse_command(argv)
        except SystemExit as e:
            pytest.fail(f"{os.path.relpath(path, ROOT)}: `{shlex.join(argv)}` does not parse (exit {e.code})")
    for argv in inline:  # whole commands in prose parse; short mentions name an existing subcommand / tool
        if len(argv) >= 6:
            parse_command(argv)
        elif argv[0] == "longlive" and len(argv) > 1:
            assert argv[1] in SUBCOMMANDS or argv[1].isupper(), (path, argv)
        elif argv[0] == "python":
            assert importlib.util.find_spec(argv[2]) is not None, (path, argv)


def test_guides_cover_every_workflow_and_quote_commands():
    names = {os.path.basename(p)[:-3] for p in DOCS if "guides" in p}
    assert {"data", "train", "distill", "generate", "serve", "slurm"} <= names
    counted = {os.path.basename(p): len(quoted_commands(open(p).read())[0]) for p in DOCS if "guides" in p}
    assert all(n >= 1 for name, n in counted.items() if name != "README.md"), counted
    assert "bench/RESULTS.md" in open(os.path.join(ROOT, "docs", "numbers.md")).read()


# ----- end to end at the tiny scale ------------------------------------------------------------------------
def test_quickstart(tmp_path):
    """The default lane's end-to-end recipe (three CLI processes; most of the time is their imports)."""
    out = tmp_path / "qs"
    run_recipe("quickstart", tmp_path, *_sets(["data.height=32", "data.width=32", "data.num_frames=5",
                                               "data.num_videos=1", "train.max_steps=2", "train.save_interval=2",
                                               "train.log_interval=1", "infer.height=32", "infer.width=32",
                                               "infer.denoising_steps=[1000]"]), OUT=str(out))
    assert [m["step"] for m in _metrics(out / "run")] == [1, 2]
    assert os.path.exists(out / "run" / "checkpoints" / "step_00000002" / "COMPLETE")
    saved = torch.load(out / "latents.pt")
    assert [(p["start_chunk"], p["prompt"]) for p in saved["prompts"]] == [
        (0, "a red square slides right on a black background"), (4, "a blue circle moves down on a gray background")]
    assert saved["latents"].shape == (1, 16, 8, 4, 4)      # 8 chunks of 1 latent frame, 32x32 pixels
    video = read_mp4(out / "video.mp4")
    assert video.shape == (29, 32, 32, 3)                  # 1 + 4 * 7 pixel frames
    sheet = np.asarray(Image.open(out / "sheet.png").convert("RGB"))
    meta = json.load(open(str(out / "sheet.png") + ".json"))
    assert [t["frame"] for t in meta["tiles"]] == [0, 4, 8, 12, 16, 20, 24, 28]
    x, y, w, h = meta["tiles"][3]["box"]
    assert np.array_equal(sheet[y:y + h, x:x + w], video[12])


@pytest.mark.slow  # 30-40 s on the loaded 2-core machine (two CLI processes)
def test_multishot_prompt_file(tmp_path):
    out = tmp_path / "ms.mp4"
    run_recipe("multishot", tmp_path, *_sets(["infer.height=32", "infer.width=32", "infer.denoising_steps=[1000]"]),
               OUT=str(out))
    prompts = torch.load(tmp_path / "ms.pt")["prompts"]
    assert [(p["start_chunk"], p["new_shot"]) for p in prompts] == [(0, False), (3, True), (6, True)]
    assert prompts[1]["prompt"] == "The scene transitions. a blue circle moves down on a gray background"
    assert read_mp4(out).shape == (29, 32, 32, 3)
    assert os.path.exists(tmp_path / "ms.png")


@pytest.mark.slow  # a second generate run of the same recipe (only the prompt file differs)
def test_multishot_prompt_switch_file(tmp_path):
    out = tmp_path / "sw.mp4"
    run_recipe("multishot", tmp_path, *_sets(["infer.height=32", "infer.width=32", "infer.denoising_steps=[1000]"]),
               OUT=str(out), PROMPTS=os.path.join(EXAMPLES, "multishot", "switches.jsonl"))
    prompts = torch.load(tmp_path / "sw.pt")["prompts"]
    assert [(p["start_chunk"], p["new_shot"]) for p in prompts] == [(0, False), (3, False), (6, False)]


@pytest.mark.slow  # preprocess + a 2-process training job through the fake Slurm: ~1-2 min
def test_wan21_balanced_sp_through_slurm(tmp_path):
    fake = os.path.join(ROOT, "slurm", "fake")
    videos = _synthetic_videos(tmp_path / "videos")
    run = tmp_path / "run"
    sets = _sets(TINY_MODEL, TINY_DATA, TINY_INFER, [
        "parallel.sp_size=2", "data.buckets=[[32,32]]", "data.duration_groups=[0.5,1.0,2.0]",
        "data.min_source_side=16",
        "data.filters={min_shot_seconds: 0.25, min_source_fps: 1, max_shake: 1, min_sharpness: 0, min_motion: 0}",
        "launch.nodes=1", "launch.gpus_per_node=2", "launch.cpus_per_task=1", f"launch.rdzv_port={free_port()}",
        "launch.env={OMP_NUM_THREADS: '1'}"])
    r = run_recipe("wan2.1-ar-balanced-sp", tmp_path, *sets, MODE="slurm", VIDEOS=videos, CACHE=str(tmp_path / "cache"),
                   RUN=str(run), VAE="tiny", TEXT_ENCODER="tiny", FAKE_SLURM_JOB_ID="7",
                   PATH=os.pathsep.join([fake, os.path.dirname(sys.executable), os.environ["PATH"]]))
    assert "2 video(s) validated; 0 problem(s)" in r.stdout
    assert "Submitted batch job 7" in r.stdout
    snap = load_config(run / "config.yaml")
    assert snap.parallel.sp_size == 2 and snap.data.source == "zarr" and snap.data.path == str(tmp_path / "cache")
    assert [m["step"] for m in _metrics(run)] == [1, 2]
    for name in ("COMPLETE", "trainer_rank0.pt", "__0_0.distcp", "__1_0.distcp"):  # SP=2, DP=1: both ranks wrote
        assert os.path.exists(run / "checkpoints" / "step_00000002" / name)


@pytest.mark.slow  # torchrun training with emulated NVFP4 linears, then generation from the NVFP4 KV cache
def test_wan22_nvfp4(tmp_path):
    run = tmp_path / "run"
    sets = _sets(TINY_MODEL, TINY_INFER, ["parallel.sp_size=1", "quant.linear=nvfp4_emulated", "data.source=synthetic",
                                          f"data.path={tmp_path / 'data'}", "data.height=32", "data.width=32",
                                          "data.num_frames=13", "data.num_videos=2"])
    run_recipe("wan2.2-5b-nvfp4", tmp_path, *sets, RUN=str(run), NPROC="1", OUT=str(tmp_path / "nvfp4.mp4"))
    snap = load_config(run / "config.yaml")
    assert snap.quant.linear == "nvfp4_emulated" and snap.quant.kv_cache == "nvfp4"
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    assert read_mp4(tmp_path / "nvfp4.mp4").shape == (13, 32, 32, 3)     # 4 chunks


@pytest.mark.slow  # train a tiny teacher, distill one DMD step, generate 2-step with the adapter
def test_lora_dmd(tmp_path):
    from megatron_longlive.cli.main import main

    teacher = tmp_path / "teacher"
    assert main(["train", "-c", os.path.join(EXAMPLES, "quickstart", "config.yaml"), "--no-progress",
                 *_sets(TINY_DATA, [f"train.output_dir={teacher}", "train.max_steps=2", "train.save_interval=2"])]) == 0
    sets = _sets(TINY_MODEL, TINY_INFER, [
        "data.source=synthetic", f"data.path={tmp_path / 'data'}", "data.height=32", "data.width=32",
        "data.num_frames=13", "data.num_videos=2", "distill.max_steps=1", "distill.critic_ratio=1",
        "distill.rollout_frames=2", "distill.rank=4", "distill.critic_rank=4", "distill.save_interval=1",
        "infer.denoising_steps=[1000,500]"])
    distill = tmp_path / "distill"
    run_recipe("lora-dmd", tmp_path, *sets, TEACHER=str(teacher), DISTILL=str(distill), OUT=str(tmp_path / "l.mp4"))
    adapter = distill / "step_000001" / "generator"
    assert os.path.exists(adapter / "adapter_config.json")
    assert read_mp4(tmp_path / "l.mp4").shape == (13, 32, 32, 3)


@pytest.mark.slow  # two torchrun ranks vs one process
def test_sp_inference_equals_one_rank(tmp_path):
    from megatron_longlive.cli.main import main

    sets = _sets(TINY_INFER, ["model.preset=tiny"])
    run_recipe("sp-inference", tmp_path, *sets, "--latents-out", str(tmp_path / "sp2.pt"), NPROC="2",
               OUT=str(tmp_path / "sp2.mp4"), PROMPT="a red square slides right")
    assert main(["generate", "-c", os.path.join(EXAMPLES, "sp-inference", "config.yaml"), *sets,
                 "--set", "parallel.sp_size=1",
                 "--prompt", "a red square slides right", "--out", str(tmp_path / "one.mp4"),
                 "--latents-out", str(tmp_path / "one.pt"), "--no-progress"]) == 0
    sp2, one = torch.load(tmp_path / "sp2.pt")["latents"], torch.load(tmp_path / "one.pt")["latents"]
    assert sp2.shape == one.shape == (1, 16, 4, 4, 4)
    torch.testing.assert_close(sp2, one, rtol=0, atol=1e-5)


def test_no_stray_example_outputs_are_tracked():
    """Recipes write under OUT/RUN (ignored); nothing generated sits in examples/ recipe folders."""
    for name in RECIPES:
        for path in glob.glob(os.path.join(EXAMPLES, name, "**", "*"), recursive=True):
            assert not path.endswith((".mp4", ".pt", ".png", ".distcp")), path
