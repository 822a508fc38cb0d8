"""Several processes (torchrun, DDP over gloo on the CPU): exactness against one process,
fault tolerance, sharded evaluation and one-line errors. Real processes on 127.0.0.1,
two ranks, a tiny VGG16 (width 1/16) and ~50 images, so every run takes seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hahnet
from hahnet.training import checkpoint, distributed
from hahnet.cli import commands as cli
from hahnet.data.datasets import load_dataset
from hahnet.training.trainer import Trainer, accuracy, epoch_batches, epoch_plan, plan_batches

from conftest import LAUNCH_VARS, child_env, finish, free_port, start_torchrun
from conftest import make_cifar as write_cifar
from conftest import make_tiny_config as tiny_config
from conftest import make_tiny_dataset as tiny_dataset
from conftest import run_torchrun as torchrun
TRAIN = ["--hah", "--width", "0.0625", "--batch-size", "16", "--seed", "7"]

# A worker script: plain `hahnet` CLI, except that with KILL_AT_STEP set, rank KILL_RANK
# sends itself KILL_SIGNAL at that training step (only in torchrun's first attempt).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from hahnet.cli import commands as cli
    from hahnet.training import trainer as train

    at = int(os.environ.get("KILL_AT_STEP", "0"))
    if at and os.environ.get("RANK") == os.environ.get("KILL_RANK", "1") \\
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        step, steps = train.Trainer.train_step, [0]

        def train_step(self, *args, **kwargs):
            steps[0] += 1
            if steps[0] == at:
                os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
            return step(self, *args, **kwargs)

        train.Trainer.train_step = train_step
    sys.exit(cli.main(sys.argv[1:]))
""")


# ---------------------------------------------------------------- helpers

def start_ranks(tmp: Path, argv: list[str], world_size: int = 2,
                **extra: str) -> list[subprocess.Popen]:
    """``world_size`` processes with torchrun's environment, without torchrun (so that
    each rank's own output and exit code can be checked)."""
    port, procs = str(free_port()), []
    for rank in range(world_size):
        env = child_env(tmp, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, **extra)
        procs.append(subprocess.Popen([sys.executable] + argv, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def lines(text: str) -> list[str]:
    """Output lines without tqdm's carriage-return redraws."""
    return [l for l in text.replace("\r", "\n").splitlines()
            if l.strip() and "img/s]" not in l and "img/s, loss" not in l]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / checkpoint.MODEL_FILE))


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |a - b| over floating-point weights, fraction of them off by more than 1e-5);
    integer buffers (num_batches_tracked) must be equal."""
    assert a.keys() == b.keys()
    worst, off, total = 0.0, 0, 0
    for key in a:
        if not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        diff = (a[key] - b[key]).abs()
        worst = max(worst, float(diff.max()))
        off += int((diff > 1e-5).sum())
        total += diff.numel()
    return worst, off / total


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py")


# ---------------------------------------------------------------- single process: no-ops

def test_shard_splits_whole_batches_exactly_once():
    for n in (0, 1, 5, 16, 37, 100):
        for world in (1, 2, 3, 4):
            for align in (1, 8, 500):
                parts = [distributed.shard(n, distributed.DistEnv(r, world), align)
                         for r in range(world)]
                seen = [i for p in parts for i in range(n)[p]]
                assert seen == list(range(n))
                assert all(p.start % align == 0 or p.start == n for p in parts)


def test_single_process_is_plain(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    env = distributed.setup(torch.device("cpu"))
    assert not env.active and distributed.wrapper(env, sync_bn=True) is None
    assert distributed.default_threads(None) is None and distributed.default_threads(3) == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.default_threads(None) == max(1, distributed._cpu_count() // 2)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.setup(torch.device("cpu"))


def test_sync_batchnorm_keeps_checkpoint_keys_and_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    model = hahnet.vgg16(hah=False, width=0.0625, num_classes=4)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32)
    want = model(x)
    converted = distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    assert any(isinstance(m, distributed.SyncBatchNorm2d) for m in converted.modules())
    assert list(converted.state_dict()) == list(plain)
    for key, value in plain.items():  # one training forward above changed the running stats
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(converted.state_dict()[key], value)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))
    converted.train()
    hahnet.vgg16(hah=False, width=0.0625, num_classes=4).load_state_dict(
        converted.state_dict())  # and loads into a plain model


# ---------------------------------------------------------------- 2 ranks, library level

WORKER = textwrap.dedent("""
    import sys, torch
    from hahnet.training import distributed
    from hahnet.eval import metrics as ev
    from hahnet.training.trainer import Trainer, accuracy, epoch_batches, epoch_plan, plan_batches
    from conftest import make_tiny_config as tiny_config
    from conftest import make_tiny_dataset as tiny_dataset

    torch.set_num_threads(1)
    out = sys.argv[1]
    env = distributed.setup(torch.device("cpu"), timeout_s=60)
    result = {}
    for hah in (True, False):
        trainer = Trainer(tiny_config(hah=hah), tiny_dataset(n_test=37), out, env.device,
                          env.rank, env.world_size, distributed.wrapper(env, sync_bn=True))
        indices, params = next(epoch_batches(48, 16, 7, 0, True))
        trainer.train_step(*trainer.local_batch(indices, params))
        result[hah] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    model, test = trainer.model.eval(), trainer.dataset.test
    result["sharded"] = accuracy(model, test, env.device, 8, env=env)
    result["clean"] = ev.clean_accuracy(model, test.images, test.labels, 8, env=env)
    result["noise"] = ev.noise_accuracy(model, test.images, test.labels, (0.05, 0.3), 2, 5, 8,
                                        env=env).per_draw
    result["tiny"] = ev.clean_accuracy(model, test.images[:1], test.labels[:1], 8, env=env)
    result["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(result, f"{out}/rank{env.rank}.pt")
    distributed.teardown(env)
""")


def test_two_ranks_gradient_and_sharded_evaluation_equal_one_process(tmp_path):
    """The crux: DDP's gradient hooks see the HaH gradient (routed inside the custom
    autograd Function into the weight gradient); with SyncBatchNorm the 2-rank gradient
    of one step equals the 1-process gradient of the same global batch. Sharded clean
    and noise accuracy equal one process's exactly."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    results = finish(start_ranks(tmp_path, [str(script), str(tmp_path)]))
    for rc, _, err in results:
        assert rc == 0, err
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    from hahnet.eval import metrics as ev
    for hah in (True, False):
        single = Trainer(tiny_config(hah=hah), tiny_dataset(n_test=37), tmp_path,
                         torch.device("cpu"))
        indices, params = next(epoch_batches(48, 16, 7, 0, True))
        single.train_step(*single.local_batch(indices, params))
        worst = 0.0
        for name, p in single.model.named_parameters():
            g0, g1 = ranks[0][hah][name], ranks[1][hah][name]
            assert torch.equal(g0, g1), f"ranks disagree on {name}"
            scale = float(p.grad.abs().max())
            err = float((g0 - p.grad).abs().max())
            worst = max(worst, err / max(scale, 1.0))
            assert err <= 1e-5 * max(scale, 1.0), (hah, name, err, scale)
        print(f"\nhah={hah}: max |grad_2ranks - grad_1proc| / max(|grad|, 1) = {worst:.1e}")
        if hah:  # the HaH part of the gradient is far larger than the DDP error: not lost
            fresh = Trainer(tiny_config(hah=True), tiny_dataset(n_test=37), tmp_path,
                            torch.device("cpu"))
            x, y = fresh.local_batch(indices, params)
            torch.nn.functional.cross_entropy(fresh.model(x), y).backward()  # CE only
            from hahnet.nn.hah import hah_convs
            names = {id(p): n for n, p in fresh.model.named_parameters()}
            for conv in hah_convs(fresh.model):
                name = names[id(conv.weight)]
                want = single.model.get_parameter(name).grad
                hah_part = torch.linalg.vector_norm(want - conv.weight.grad)
                ddp_error = torch.linalg.vector_norm(ranks[0][True][name] - want)
                assert hah_part > 10 * ddp_error, (name, float(hah_part), float(ddp_error))
                print(f"{name}: |HaH part| / |2-rank error| = {float(hah_part / ddp_error):.0f}")

    model = Trainer(tiny_config(hah=False), tiny_dataset(n_test=37), tmp_path,
                    torch.device("cpu")).model
    model.load_state_dict(ranks[0]["state"])
    model.eval()
    test = tiny_dataset(n_test=37).test
    assert ranks[0]["sharded"] == ranks[1]["sharded"] == accuracy(model, test, torch.device("cpu"), 8)
    assert ranks[0]["clean"] == ranks[1]["clean"] == ev.clean_accuracy(model, test.images,
                                                                       test.labels, 8)
    noise = ev.noise_accuracy(model, test.images, test.labels, (0.05, 0.3), 2, 5, 8).per_draw
    assert ranks[0]["noise"] == ranks[1]["noise"] == noise
    assert ranks[0]["tiny"] == ev.clean_accuracy(model, test.images[:1], test.labels[:1], 8)


STEPS = textwrap.dedent("""
    import sys, torch
    from hahnet.training import distributed
    from hahnet.training.trainer import Trainer
    from conftest import make_tiny_config, make_tiny_dataset

    torch.set_num_threads(1)
    out = sys.argv[1]
    env = distributed.setup(torch.device("cpu"), timeout_s=60)
    trainer = Trainer(make_tiny_config(epochs=2), make_tiny_dataset(n_train=56), out,
                      env.device, env.rank, env.world_size, distributed.wrapper(env, sync_bn=True))
    steps = []

    def record(step):
        steps.append({"at": (step.epoch, step.step), "indices": step.indices.clone(),
                      "loss": float(step.loss),
                      "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                      "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()}})

    trainer.fit(on_gradients=record)
    torch.save(steps, f"{out}/steps{env.rank}.pt")
    distributed.teardown(env)
""")


def one_process_step(trainer: Trainer, weights: dict, indices: torch.Tensor,
                     params) -> tuple[float, dict[str, torch.Tensor]]:
    """One process's loss and gradient at ``weights`` on one global batch."""
    trainer.model.load_state_dict(weights)
    seen = {}

    def keep(loss):
        seen["loss"] = float(loss)
        seen["grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    trainer.train_step(*trainer.local_batch(indices, params), before_update=keep)
    return seen["loss"], seen["grads"]


def test_torchrun_every_step_of_two_epochs_equals_one_process(tmp_path):
    """HaH training under torchrun (2 ranks, gloo, --sync-bn) for 2 epochs of 3 steps on 56
    images (batch 16: each epoch reshuffles and leaves out a different 8). At every step:
    both ranks hold bit-equal gradients, equal to one process's gradient at the same
    weights on the same global batch (1e-4 relative: fp32 sums in another order reach
    1e-5 on one thread; a wrong batch, scale or mean is off by far more); the global
    batch is the one a single-process run draws; the ranks' mean loss is the one-process
    loss. Steps are
    compared one by one, from the ranks' own weights, because Adam amplifies rounding
    differences over many steps (see the end-to-end test, limited to 2 steps)."""
    script = tmp_path / "steps.py"
    script.write_text(STEPS)
    run = torchrun(tmp_path, [str(tmp_path / "run")], script=script)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / "run" / f"steps{r}.pt") for r in range(2)]

    config, dataset = tiny_config(epochs=2), tiny_dataset(n_train=56)
    single = Trainer(config, dataset, tmp_path / "one", torch.device("cpu"))
    drawn = []
    single.fit(on_gradients=lambda step: drawn.append(((step.epoch, step.step),
                                                       step.indices.clone())))
    assert [at for at, _ in drawn] == [(e, s) for e in range(2) for s in range(3)]
    left_out = [set(range(56)) - set(torch.cat([i for (e, _), i in drawn if e == epoch]).tolist())
                for epoch in range(2)]
    assert [len(x) for x in left_out] == [8, 8] and left_out[0] != left_out[1]

    probe = Trainer(config, dataset, tmp_path / "probe", torch.device("cpu"))
    batches = [b for epoch in range(2) for b in plan_batches(*epoch_plan(
        56, config.seed, epoch, config.augment), config.batch_size)]
    worst = 0.0
    for k, (at, indices) in enumerate(drawn):
        a, b = ranks[0][k], ranks[1][k]
        assert a["at"] == b["at"] == at
        assert torch.equal(a["indices"], indices) and torch.equal(b["indices"], indices), at
        loss, grads = one_process_step(probe, a["weights"], *batches[k])
        assert (a["loss"] + b["loss"]) / 2 == pytest.approx(loss, rel=1e-5), at
        for name, want in grads.items():
            assert torch.equal(a["grads"][name], b["grads"][name]), (at, name)
            error = float((a["grads"][name] - want).abs().max() / want.abs().max())
            worst = max(worst, error)
            assert error <= 1e-4, (at, name, error)  # fp32 sums in another order: ~1e-5
    print(f"\n6 steps: max over steps and tensors of |g_2ranks - g_1proc|max / |g_1proc|max "
          f"= {worst:.1e}")


RESNET_WORKER = textwrap.dedent("""
    import sys, torch
    from hahnet.training import distributed
    from hahnet.training.trainer import Trainer, epoch_batches
    from conftest import make_tiny_config as tiny_config
    from conftest import make_tiny_dataset as tiny_dataset

    torch.set_num_threads(1)
    out = sys.argv[1]
    env = distributed.setup(torch.device("cpu"), timeout_s=60)
    trainer = Trainer(tiny_config(arch="resnet18"), tiny_dataset(), out, env.device,
                      env.rank, env.world_size, distributed.wrapper(env, sync_bn=True))
    indices, params = next(epoch_batches(48, 16, 7, 0, True))
    trainer.train_step(*trainer.local_batch(indices, params))
    torch.save({n: p.grad.clone() for n, p in trainer.model.named_parameters()},
               f"{out}/rank{env.rank}.pt")
    distributed.teardown(env)
""")


def test_two_ranks_train_a_hah_resnet_like_one_process(tmp_path):
    """The same for a residual network: its HaH blocks sit inside residual blocks, its
    later stages keep (synchronized) BatchNorm; one 2-rank step's gradient equals the
    1-process gradient of the same global batch, with the HaH part far above the error."""
    script = tmp_path / "worker.py"
    script.write_text(RESNET_WORKER)
    for rc, _, err in finish(start_ranks(tmp_path, [str(script), str(tmp_path)])):
        assert rc == 0, err
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    indices, params = next(epoch_batches(48, 16, 7, 0, True))
    single = Trainer(tiny_config(arch="resnet18"), tiny_dataset(), tmp_path, torch.device("cpu"))
    single.train_step(*single.local_batch(indices, params))
    plain = Trainer(tiny_config(arch="resnet18"), tiny_dataset(), tmp_path, torch.device("cpu"))
    x, y = plain.local_batch(indices, params)
    torch.nn.functional.cross_entropy(plain.model(x), y).backward()  # CE only
    from hahnet.nn.hah import hah_convs
    hah_weights = {id(conv.weight) for conv in hah_convs(single.model)}
    assert len(hah_weights) == 5
    for name, p in single.model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        error = float((ranks[0][name] - p.grad).abs().max())
        assert error <= 1e-5 * max(float(p.grad.abs().max()), 1.0), (name, error)
        if id(p) in hah_weights:
            hah_part = float((p.grad - plain.model.get_parameter(name).grad).abs().max())
            assert hah_part > 10 * error, (name, hah_part, error)


# ---------------------------------------------------------------- 2 ranks, the CLI

@pytest.mark.parametrize("hah", [True, False])
def test_torchrun_sync_bn_training_equals_one_process(tmp_path, data, hah):
    """2 ranks x 8 images with --sync-bn vs 1 process x 16 images, same seed: the weights
    after 2 Adam steps (32 images). Adam turns float-rounding differences of near-zero
    gradients into +-lr steps, and from about 3 steps on into top-k flips that spread, so
    the weights are compared after 2 steps only (a negligible fraction may differ by more
    than 1e-5, printed); every step of 2 epochs is checked one by one above."""
    flag = "--hah" if hah else "--no-hah"
    args = ["train", "--data", str(data), "--epochs", "1", "--limit-train", "32", *TRAIN, flag]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    run = torchrun(tmp_path, args + ["--out", str(tmp_path / "two"), "--sync-bn"])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert not any(k.startswith("module.") for k in two)
    worst, fraction = compare(one, two)
    print(f"\n{flag}: max |w_1proc - w_2proc| = {worst:.2e}, fraction > 1e-5 = {fraction:.2e}")
    assert fraction < 5e-3 and worst < 1e-3
    # only rank 0 printed and wrote; sharded evaluation equals one process on its weights
    err = lines(run.stderr)
    assert sum(l.startswith("training vgg16") for l in err) == 1
    assert sum(l.startswith("data: ") for l in err) == 1
    assert run.stdout.count("checkpoint:") == 1
    metrics = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    test = load_dataset(data).test
    model = checkpoint.load(tmp_path / "two")
    assert metrics[0]["eval_acc"] == accuracy(model, test, torch.device("cpu"))
    assert model.config == checkpoint.load(tmp_path / "one").config


def test_killed_worker_is_restarted_and_resumes_to_the_same_weights(tmp_path, data):
    """SIGKILL rank 1 two steps into epoch 2; torchrun restarts both ranks, --resume auto
    continues from epoch 1's checkpoint; the result is bit-identical to a run that was
    never interrupted."""
    args = ["train", "--data", str(data), "--epochs", "2", *TRAIN, "--sync-bn"]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    runs = [start_torchrun(tmp_path, args + ["--out", str(tmp_path / "straight")]),
            start_torchrun(tmp_path, args + ["--out", str(tmp_path / "killed"), "--resume",
                                             "auto"],
                           script=script, restarts=1, KILL_AT_STEP="5", KILL_RANK="1")]
    (rc, _, err), (rc_killed, _, err_killed) = finish(runs)
    assert rc == 0, err[-3000:]
    assert rc_killed == 0, err_killed[-3000:]
    err = "\n".join(lines(err_killed))
    assert "exitcode: -9" in err or "Signals.SIGKILL" in err or "-9" in err
    assert "resuming" in err and "after epoch 1/2" in err
    metrics = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in metrics] == [0, 1]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dead_or_hung_peer_stops_the_others_with_one_line(tmp_path, data):
    """Without torchrun's agent: rank 1 dies (SIGKILL) or hangs (SIGSTOP) mid-epoch;
    rank 0 must exit non-zero with one line, within --dist-timeout, never hang."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    launches = {}
    for how in ("SIGKILL", "SIGSTOP"):
        argv = [str(script), "train", "--data", str(data), "--epochs", "50", *TRAIN,
                "--out", str(tmp_path / how), "--dist-timeout", "3"]
        launches[how] = start_ranks(tmp_path, argv, KILL_AT_STEP="5", KILL_RANK="1",
                                    KILL_SIGNAL=how)
    started = time.monotonic()
    try:
        results = {how: finish(procs[:1], timeout=90)[0] for how, procs in launches.items()}
        seconds = time.monotonic() - started
    finally:
        for procs in launches.values():
            procs[1].kill()
            procs[1].communicate()
    for how, (rc, _, err) in results.items():
        assert rc == 2, (how, err[-3000:])
        errors = [l for l in lines(err) if "error" in l.lower() or "Traceback" in l]
        assert len(errors) == 1, (how, err[-3000:])
        assert errors[0].startswith(
            "hahnet train: error: rank 0: lost contact with the other processes"), how
    assert seconds < 60


def test_errors_are_one_line_from_rank_0_and_every_rank_fails(tmp_path, data):
    """A batch size that does not divide over the ranks, and fewer training images than
    ranks: rank 0 prints one line naming the fix, rank 1 prints nothing, both exit 2."""
    cases = {"--batch-size 15": "--batch-size 15 is the global batch and must divide evenly "
                                "over 2 processes; use a multiple of 2",
             "--batch-size 2 --limit-train 1": "only 1 training images for a global batch of 2; "
                                               "lower --batch-size or use more data"}
    launches = {flags: start_ranks(tmp_path, ["-m", "hahnet", "train", "--data", str(data),
                                              "--width", "0.0625", "--out",
                                              str(tmp_path / flags.replace(" ", "_")),
                                              *flags.split()])
                for flags in cases}
    for flags, procs in launches.items():
        (rc0, _, err0), (rc1, out1, err1) = finish(procs)
        assert rc0 == 2 and rc1 == 2, (flags, err0, err1)
        shown = lines(err0)
        assert [l for l in shown if not l.startswith("data: ")] == \
            [f"hahnet train: error: {cases[flags]}"], (flags, err0)
        assert err1 == "" and out1 == "", (flags, err1)


def without_seconds(value):
    """A results.json value without its wall-clock times (which differ run to run)."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    return [without_seconds(v) for v in value] if isinstance(value, list) else value


def test_torchrun_eval_shards_everything_and_equals_one_process(tmp_path, data):
    """`hahnet eval` under torchrun: clean, noise and every attack (the paper's, PGD,
    Square, and --attacks all: AutoAttack, margin, BPDA, transfer from a second checkpoint,
    eps sweeps) sharded over 2 ranks in whole batches (batch i keeps seed + i), counts
    summed; the report equals one process's."""
    run, source = tmp_path / "run", tmp_path / "source"
    assert cli.main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TRAIN]) == 0
    assert cli.main(["train", "--data", str(data), "--out", str(source), "--epochs", "1",
                     *TRAIN[1:], "--no-hah"]) == 0
    args = ["eval", str(run), "--data", str(data), "--noise", "0.05,0.1", "--noise-draws", "2",
            "--attack-limit", "0", "--apgd-steps", "3", "--pgd-steps", "2", "--pgd-restarts",
            "2", "--square-limit", "6", "--square-queries", "10", "--batch-size", "4",
            "--threads", "1", "--attacks", "all", "--fab-steps", "2", "--autoattack-queries",
            "10", "--restarts", "2", "--adaptive-limit", "12", "--sweep-limit", "8",
            "--transfer-steps", "2", "--transfer-from", str(source), str(run)]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    two = torchrun(tmp_path, args + ["--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("report:") == 1 and two.stderr.count("data: ") == 1
    assert not (tmp_path / "two" / "partial").exists()  # rows kept only until the report
    one_doc, two_doc = (json.loads((tmp_path / d / "results.json").read_text())
                        for d in ("one", "two"))
    (a,), (b,) = one_doc["models"], two_doc["models"]
    a, b = without_seconds(a), without_seconds(b)
    a.pop("checkpoint"), b.pop("checkpoint")
    assert a["n_images"] == 16 and len(a["attacks"]["Linf"]["apgd"]["robust"]) == 16
    adaptive = a["attacks"]["L2"]["adaptive"]
    assert list(adaptive["rows"]) == ["AutoAttack", "margin", "BPDA", "transfer"]
    assert list(adaptive["rows"]["transfer"]["stages"]) == ["from source"]  # not itself
    assert len(adaptive["sweeps"]) == 2 and adaptive["worst"]["n_images"] == 12
    assert a == b
