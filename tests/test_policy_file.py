"""Policy files and apga.load_policy: the module acts as the training-time numpy policy, single and
batched, numpy and torch; files load without code, older format versions keep loading, and a
traced / scripted module gives the same outputs."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from gymnasium import spaces

import apga
from apga import policy_file
from apga.errors import ApgaError
from apga.oracle import policies
from apga.oracle.rl import RLOracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
DATA = os.path.join(ROOT, "tests", "data")
SHORT = ["budget.iterations=6", "eval.every=2", "eval.episodes=2", "checkpoint.every=2",
         "algorithm.batch_size=8", "env.horizon=60"]
REACHER = ["env.id=Reacher-v5", "env.horizon=20", "workers.n=3", "algorithm.batch_size=4",
           "budget.iterations=4", "eval.every=2", "eval.episodes=2", "checkpoint.every=2",
           "algorithm.step_size=0.2"]


def _train(tmp_path, overrides, name="run"):
    cfg = apga.load_config(QUICKSTART, overrides)
    out = str(tmp_path / name)
    apga.train(cfg, out, progress=False)
    return cfg, out


def _theta(path):
    spec, tensors = policy_file.read(path)
    return spec, policy_file.flat_parameters(spec, tensors)


def _observations(space, n, seed=0):
    g = np.random.default_rng(seed)
    low = np.where(np.isfinite(space.low), space.low, -3.0)
    high = np.where(np.isfinite(space.high), space.high, 3.0)
    return g.uniform(low, high, size=(n,) + space.shape)


@pytest.mark.parametrize("overrides", [SHORT, SHORT[:1] + REACHER], ids=["CartPole", "Reacher"])
def test_load_policy_acts_as_the_training_policy(tmp_path, overrides):
    cfg, out = _train(tmp_path, overrides)
    oracle = RLOracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed)
    try:
        m = apga.read_metrics(out)
        evals = m["eval_return"]
        for which in ("final", "best"):
            policy = apga.load_policy(out, which=which)
            assert isinstance(policy, torch.nn.Module)
            spec, theta = _theta(os.path.join(out, policy_file.FILE_NAMES[which]))
            it = spec["run"]["iteration"]
            if which == "final":
                assert it == int(m["iteration"][-1]) and spec["run"]["eval_return"] == evals[-1]
            else:  # the first iteration with the highest logged evaluation
                done = ~np.isnan(evals)
                assert spec["run"]["eval_return"] == np.nanmax(evals)
                assert it == int(m["iteration"][done][np.argmax(evals[done])])
            assert policy.observation_space == oracle._env_slots(oracle.keys[0], 1)[0].observation_space
            obs = _observations(policy.observation_space, 64)
            expected = policies.greedy_action(oracle.spec, theta, obs)
            batch = policy(obs)
            assert isinstance(batch, np.ndarray) and batch.shape == expected.shape
            single = policy(obs[5])
            as_torch = policy(torch.from_numpy(obs))
            assert isinstance(as_torch, torch.Tensor)
            if isinstance(policy.action_space, spaces.Discrete):
                assert np.array_equal(batch, expected) and single == expected[5]
                assert np.array_equal(as_torch.numpy(), expected)
                assert policy.action_space == spaces.Discrete(2)
            else:
                np.testing.assert_allclose(batch, expected, rtol=0, atol=1e-12)
                np.testing.assert_allclose(single, expected[5], rtol=0, atol=1e-12)
                np.testing.assert_allclose(as_torch.numpy(), expected, rtol=0, atol=1e-12)
                assert single.shape == policy.action_space.shape
                assert policy.action_space.contains(single.astype(np.float32))
        # the parameters of policy_final are the run's final point
        final_theta = _theta(os.path.join(out, "policy_final.safetensors"))[1]
        assert oracle.evaluate(final_theta, cfg.eval.episodes, int(m["iteration"][-1])) == evals[-1]
    finally:
        oracle.close()


def test_act_samples_like_training(tmp_path):
    policy = apga.load_policy(os.path.join(DATA, "policy_v1_pendulum.safetensors"))
    obs = np.array([[1.0, 0.0, 0.5], [-0.3, 0.9, -2.0]])
    a = policy.act(obs, generator=torch.Generator().manual_seed(3))
    b = policy.act(obs, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(a, b) and a.shape == (2, 1) and np.all(np.abs(a) <= 2.0)
    # the same draw by hand: squash(mu + sigma * z), z ~ N(0, 1) from the same generator
    spec = policies.make_spec(policy.observation_space, policy.action_space, [4])
    theta = _theta(os.path.join(DATA, "policy_v1_pendulum.safetensors"))[1]
    mu, sigma = policies.mean_std(spec, theta, obs)
    z = torch.randn((2, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(a, 2.0 * np.tanh(mu + sigma * z), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(policy.act(obs, deterministic=True), policy(obs))


def test_act_categorical_follows_the_softmax(tmp_path):
    cfg, out = _train(tmp_path, SHORT[:1] + ["budget.iterations=1", "eval.every=0"])
    policy = apga.load_policy(out)
    oracle = RLOracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed)
    obs = np.tile(np.array([0.1, 0.5, -0.1, -0.5]), (20000, 1))
    p = policies.probs(oracle.spec, _theta(os.path.join(out, "policy_final.safetensors"))[1], obs[:1])[0]
    oracle.close()
    draws = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == np.int64 and set(np.unique(draws)) <= {0, 1}
    assert abs(np.mean(draws == 1) - p[1]) < 0.015  # 20000 draws: std ~0.0035
    assert not os.path.exists(os.path.join(out, "policy_best.safetensors"))  # no evaluation ran


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated in favour of torch.export
def test_trace_script_and_export_give_the_same_outputs():
    policy = apga.load_policy(os.path.join(DATA, "policy_v1_pendulum.safetensors"))
    obs = torch.from_numpy(_observations(policy.observation_space, 32))
    traced = torch.jit.trace(policy, obs)
    scripted = torch.jit.script(policy)
    exported = torch.export.export(policy, (obs,)).module()
    assert torch.equal(traced(obs), policy(obs))
    assert torch.equal(scripted(obs), policy(obs))
    assert torch.equal(scripted(obs[0]), policy(obs[0]))
    assert torch.equal(exported(obs), policy(obs))


def test_checked_in_format_version_1_file_still_loads():
    """tests/data/policy_v1_pendulum.safetensors was written by format version 1: it must keep
    loading and giving these actions (Pendulum-v1, hidden [4], action 2 tanh(mu))."""
    policy = apga.load_policy(os.path.join(DATA, "policy_v1_pendulum.safetensors"))
    obs = np.array([[1.0, 0.0, 0.5], [-0.3, 0.9, -2.0], [0.0, -1.0, 8.0]])
    np.testing.assert_allclose(policy(obs)[:, 0], [0.93637261, -0.56968027, 1.49523991], rtol=0, atol=5e-9)
    assert policy.spec["format_version"] == 1 and policy.spec["env"]["id"] == "Pendulum-v1"
    assert policy.action_space == spaces.Box(-2.0, 2.0, (1,), np.float32)
    assert policy.observation_space == spaces.Box(np.array([-1, -1, -8], np.float32), np.array([1, 1, 8], np.float32))


def _rewrite_spec(src, dst, change):
    spec, tensors = policy_file.read(src)
    change(spec)
    from safetensors.numpy import save
    with open(dst, "wb") as f:
        f.write(save(tensors, metadata={policy_file.METADATA_KEY: json.dumps(spec)}))


@pytest.mark.parametrize("content, words", [
    (b"", "not an apga policy file"),
    (b"\x80\x05garbage", "not an apga policy file"),
    (None, "format version 99"),
    ("nospec", "not an apga policy file"),
])
def test_bad_policy_files_are_one_line_errors(tmp_path, content, words):
    src = os.path.join(DATA, "policy_v1_pendulum.safetensors")
    path = str(tmp_path / "p.safetensors")
    if content is None:
        _rewrite_spec(src, path, lambda s: s.update(format_version=99))
    elif content == "nospec":
        from safetensors.numpy import save
        with open(path, "wb") as f:
            f.write(save({"W0": np.zeros((2, 2))}))
    else:
        with open(path, "wb") as f:
            f.write(content)
    with pytest.raises(ApgaError) as info:
        apga.load_policy(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_missing_policy_is_a_clear_error(tmp_path):
    with pytest.raises(ApgaError, match="no such run directory"):
        apga.load_policy(str(tmp_path / "nope"))
    with pytest.raises(ApgaError, match="has no policy_final"):
        apga.load_policy(str(tmp_path))
    with pytest.raises(ApgaError, match="choose 'final' or 'best'"):
        apga.load_policy(str(tmp_path), which="last")


def test_heterogeneous_flag_input_is_recorded(tmp_path):
    cfg, out = _train(tmp_path, SHORT[:1] + ["budget.iterations=1", "env.invert_obs=true"])
    policy = apga.load_policy(out)
    assert policy.spec["flag_input"]["index"] == 4 and policy.obs_dim == 5
    assert policy.observation_space.shape == (5,)
    oracle = RLOracle(cfg.env, cfg.policy, cfg.workers.n, cfg.seed)
    obs = _observations(policy.observation_space, 16)
    obs[:, -1] = np.arange(16) % 2
    theta = _theta(os.path.join(out, "policy_final.safetensors"))[1]
    assert np.array_equal(policy(obs), policies.greedy_action(oracle.spec, theta, obs))
    oracle.close()
    shutil.rmtree(out)


def test_readme_policy_block_runs_verbatim(tmp_path):
    """The README's "Use the trained policy" Python block, run as written (in a scratch copy of the
    repo root: configs/ linked, runs/ created there)."""
    import re
    import subprocess
    import sys
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "load_policy" in b]
    assert len(blocks) == 1
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    proc = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("Discrete(2)")
    assert (tmp_path / "runs" / "cartpole" / "policy_best.safetensors").is_file()
