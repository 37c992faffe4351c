"""Checkpoint, resume, two-step and failure tests of the training loop (in-process), and which
errors of a real Orbax restore count as damage (`checkpoint.is_damage`).

Synthetic data (`config.dataset="synthetic"`, the loop's own deterministic source) keeps these
independent of dataset files; the CLI tests run the same paths on Fashion-MNIST.
"""
import errno
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bireal_jax import checkpoint, train
import tiny_training  # tests/tiny_training.py (also sets the XLA compilation cache)
from cli import saved_steps, truncate_step  # tests/cli.py


def tiny_config(**kw):
  """tiny_training's tiny model, saving every 4 of 12 steps, no periodic eval."""
  return tiny_training.tiny_config(**{"num_train_steps": 12, "checkpoint_every_steps": 4,
                                      "log_every_steps": 4, "eval_every_epochs": 100.0, **kw})


def load_state(workdir, step=None):
  """Raw stored TrainState tree (numpy) of a workdir, read with Orbax alone."""
  d = os.path.join(workdir, "checkpoints")
  step = step if step is not None else max(saved_steps(workdir))
  path = os.path.join(d, str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          ckptr.metadata(path).item_metadata.tree)  # no sharding to guess
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def assert_same_tree(a, b):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def test_resume_after_corrupt_latest_checkpoint_matches_uninterrupted_run(tmp_path, capsys,
                                                                         caplog):
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  # A constant lr, so that a run of 12 steps is the start of a run of 16.
  train.train_and_evaluate(tiny_config(num_train_steps=16, lr_schedule="constant"), ref)
  train.train_and_evaluate(tiny_config(num_train_steps=12, lr_schedule="constant"), run)
  assert saved_steps(run) == [4, 8, 12]
  truncate_step(run, 12)
  capsys.readouterr()
  result = train.train_and_evaluate(tiny_config(num_train_steps=16, lr_schedule="constant"), run)
  out = capsys.readouterr().out
  warned = "\n".join(r.getMessage() for r in caplog.records
                     if r.levelname == "WARNING" and r.name == "bireal_jax.checkpoint")
  assert "checkpoint step 12" in warned and "is damaged (ValueError: DATA_LOSS" in warned
  assert "falling back to step 8. Step 12 is left in place" in warned
  assert "Resuming from checkpoint step 8" in out
  assert "checkpoint step 12 not saved: the damaged step 12 is still in" in warned
  assert result["step"] == 16
  assert not os.path.exists(os.path.join(run, "checkpoints_unreadable"))  # nothing moved
  assert saved_steps(run) == [8, 12, 16]
  # Steps 9..16 were replayed from step 8 with the same data: bit-identical to no crash.
  assert_same_tree(load_state(run)["params"], load_state(ref)["params"])
  assert_same_tree(load_state(run)["batch_stats"], load_state(ref)["batch_stats"])


class NaNAtStep6(train.SyntheticData):
  """Synthetic data whose 7th batch (step index 6) holds a NaN pixel."""

  @classmethod
  def create_train_iter(cls, config, *, batch_size, seed, start_step=0, process_index=None,
                        process_count=None):
    it = super().create_train_iter(config, batch_size=batch_size, seed=seed,
                                   start_step=start_step, process_index=process_index,
                                   process_count=process_count)
    for step, batch in enumerate(it, start=start_step):
      if step == 6:
        batch["image"][0, 0, 0, 0] = np.nan
      yield batch


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path)
  with pytest.raises(train.TrainingDiverged) as e:
    train.train_and_evaluate(tiny_config(log_every_steps=100), wd, data=NaNAtStep6)
  msg = str(e.value)
  assert "non-finite training loss" in msg and "at step 7" in msg
  assert "checkpoint (step 4)" in msg
  assert saved_steps(wd) == [4]  # nothing written after the bad step
  state = load_state(wd, 4)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_absurd_learning_rate_is_stopped(tmp_path):
  c = tiny_config(model="bireal18_real", optimizer="sgd", learning_rate=1e30,
                  lr_schedule="constant", checkpoint_every_steps=100)
  with pytest.raises(train.TrainingDiverged, match="non-finite training loss"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not os.listdir(os.path.join(str(tmp_path), "checkpoints"))


class FiveClasses(train.SyntheticData):
  NUM_CLASSES = 5


def test_workdir_of_another_config_is_refused_and_left_untouched(tmp_path):
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(num_train_steps=4), wd)
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(wd) for p in fs}
  record = (tmp_path / "config.json").read_text()
  cases = [(dict(image_size=12), None, "image_shape: workdir has [8, 8, 3], config has [12, 12, 3]"),
           (dict(base_width=8), None, "model.base_width: workdir has 4, config has 8"),
           ({}, FiveClasses, "num_classes: workdir has 10, config has 5")]
  for kw, data, expected in cases:
    with pytest.raises(checkpoint.CheckpointError) as e:
      train.train_and_evaluate(tiny_config(num_train_steps=8, **kw), wd, data=data)
    assert expected in str(e.value) and "refusing" in str(e.value)
  with pytest.raises(checkpoint.CheckpointError, match="image_shape"):
    train.evaluate_checkpoint(tiny_config(image_size=12), wd)
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(wd) for p in fs}
  assert after == before and (tmp_path / "config.json").read_text() == record
  assert saved_steps(wd) == [4]


def test_two_step_init_from_clip_run_and_eval_only_mode(tmp_path, capsys):
  clip, binary = str(tmp_path / "clip"), str(tmp_path / "binary")
  res_clip = train.train_and_evaluate(tiny_config(model="bireal18_real"), clip)
  clip_state = load_state(clip)
  # The binary model starts exactly from the clip run's params and BN statistics.
  s = train.Setup(tiny_config(), binary, None)
  state = train.init_from_checkpoint(s.new_state(), clip, s.mapping)
  assert_same_tree(jax.tree.map(np.asarray, state.params), clip_state["params"])
  assert_same_tree(jax.tree.map(np.asarray, state.batch_stats), clip_state["batch_stats"])
  # Full two-step run: SGD fine-tune from the clip run, then BN re-estimation, then eval.
  c = tiny_config(init_from=clip, optimizer="sgd", learning_rate=0.01,
                  lr_schedule="piecewise", lr_boundaries=(0.05, 0.1), bn_reestimate_steps=2)
  capsys.readouterr()
  res = train.train_and_evaluate(c, binary)
  out = capsys.readouterr().out
  assert f"Initialised params and batch_stats from {clip}" in out
  assert "Re-estimated BN statistics over 2 batches" in out
  meta = json.loads((tmp_path / "binary" / "checkpoints" / "12" / "meta" / "metadata")
                    .read_text())
  assert meta["bn_reestimated"] is True
  # Eval-only mode reproduces the training run's final evaluation from its checkpoint.
  ev = train.evaluate_checkpoint(tiny_config(model="bireal18_real"), clip)
  assert ev["step"] == 12 and ev["top1"] == pytest.approx(res_clip["top1"])
  assert res["step"] == 12
  # A clip run of another width cannot initialise this model: the differing paths are named.
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.train_and_evaluate(tiny_config(init_from=clip, base_width=8), str(tmp_path / "w8"))
  assert "params/conv1/kernel: model ((3, 3, 3, 8), 'float32') vs checkpoint ((3, 3, 3, 4)" \
      in str(e.value)


def _orbax_error(fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001 - the error is the result
    return e
  raise AssertionError("expected an error")


def test_is_damage_on_real_orbax_errors_and_not_on_others(tmp_path):
  d = tmp_path / "ck"
  with ocp.CheckpointManager(d, item_names=("state",)) as m:
    for step in (1, 2, 3):
      m.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"w": np.arange(100.)})))
    m.wait_until_finished()
  for root, _, files in os.walk(d / "3" / "state"):  # truncated data files
    for f in files:
      if f not in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
        p = os.path.join(root, f)
        os.truncate(p, os.path.getsize(p) // 3)
  (d / "2" / "state" / "_METADATA").write_text("garbage{")  # unparsable metadata
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(item={"w": np.zeros(100)}))
  with ocp.CheckpointManager(d, item_names=("state",)) as m:
    for step in (3, 2):
      e = _orbax_error(lambda: m.restore(step, args=args))
      assert checkpoint.is_damage(e), (step, type(e), e)
    m.restore(1, args=args)
  assert not checkpoint.is_damage(MemoryError())
  assert not checkpoint.is_damage(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
  assert not checkpoint.is_damage(ValueError("UNAVAILABLE: NOT_FOUND-looking text"))
