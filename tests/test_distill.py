"""Knowledge distillation (--teacher): the loss, the teacher's inputs, runs and resumes with it."""
import numpy as np
import pytest
import torch

from c40.checkpoint import load_checkpoint, load_model
from c40.distill import Teacher, load_teacher
from c40.errors import C40Error, CheckpointError, ConfigError
from c40.inference import evaluate_checkpoint
from c40.train import fit
from test_train import _Stop, _stop_after, tiny_cfg


@pytest.fixture(scope="module")
def teacher_ckpt(tiny_cifar, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    fit(tiny_cfg(tiny_cifar, out, epochs=3, seed=11), progress=False)
    return out / "checkpoint.pt"


def test_the_loss_mixes_labels_and_the_teachers_softened_predictions():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    teacher = Teacher(lambda x: t, weight=0.3, temp=4.0, scale=1.0, shift=0.0)
    label_loss = torch.tensor(2.0)
    p_t = torch.softmax(t / 4, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 4, 1))).sum(1).mean()  # KL(teacher || student)
    x = torch.zeros(8, 3, 4, 4)
    assert teacher.loss(label_loss, s, x).item() == pytest.approx(0.7 * 2.0 + 0.3 * 16 * kl.item(), rel=1e-5)
    same = Teacher(lambda x: s, weight=1.0, temp=4.0, scale=1.0, shift=0.0)
    assert same.loss(label_loss, s, x).item() == pytest.approx(0.0, abs=1e-6)  # nothing to learn


def test_the_teacher_sees_the_batch_in_its_own_normalisation(teacher_ckpt, tiny_cifar, tmp_path):
    """A teacher trained with other channel statistics gets the student's batch re-normalised."""
    state = load_checkpoint(teacher_ckpt)
    state["mean"], state["std"] = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    torch.save(state, tmp_path / "other_stats.pt")
    cfg = tiny_cfg(tiny_cifar, tmp_path / "s", teacher=str(tmp_path / "other_stats.pt"))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    teacher = load_teacher(cfg, torch.device("cpu"), None, mean, std, state["classes"])
    images = torch.rand(4, 3, 32, 32)  # pixels in [0, 1]
    as_t = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    student_batch = (images - as_t(mean)) / as_t(std)
    own_batch = (images - as_t(state["mean"])) / as_t(state["std"])
    model, _ = load_model(tmp_path / "other_stats.pt")
    with torch.no_grad():
        expected = model(own_batch)
    torch.testing.assert_close(teacher.logits(student_batch), expected, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_a_student_learns_to_agree_with_its_teacher(teacher_ckpt, tiny_cifar, tmp_path):
    """With the whole loss on the teacher (distill 1), the student copies the teacher's
    predictions more closely than the same run on labels alone."""
    def predictions(path):
        return evaluate_checkpoint(path, data=tiny_cifar, tta="off")[0].preds

    runs = {}
    taught_only = dict(teacher=str(teacher_ckpt), distill=1.0, distill_temp=1.0)
    for name, extra in (("labels", {}), ("teacher", taught_only)):
        fit(tiny_cfg(tiny_cifar, tmp_path / name, epochs=6, **extra), progress=False)
        runs[name] = predictions(tmp_path / name / "checkpoint.pt")
    taught = predictions(teacher_ckpt)
    agree = {k: float(np.mean(v == taught)) for k, v in runs.items()}
    assert agree["teacher"] > agree["labels"] + 0.1, agree
    assert load_checkpoint(tmp_path / "teacher" / "checkpoint.pt")["config"]["teacher"] == str(teacher_ckpt)


def test_a_distilled_run_resumes_only_with_its_teacher(teacher_ckpt, tiny_cifar, tmp_path):
    kw = dict(subset=256, epochs=2, teacher=str(teacher_ckpt))
    with pytest.raises(_Stop):
        fit(tiny_cfg(tiny_cifar, tmp_path, **kw), report=_stop_after(1), progress=False)
    with pytest.raises(C40Error, match="teacher=.* but this run asks for None"):
        fit(tiny_cfg(tiny_cifar, tmp_path, resume=True, **{**kw, "teacher": None}), progress=False)
    res = fit(tiny_cfg(tiny_cifar, tmp_path, resume=True, **kw), progress=False)
    assert [m["epoch"] for m in res.history] == [1, 2]


def test_checkpoints_from_before_distillation_resume_without_a_teacher(tiny_cifar, tmp_path):
    kw = dict(subset=256, epochs=2)
    with pytest.raises(_Stop):
        fit(tiny_cfg(tiny_cifar, tmp_path, **kw), report=_stop_after(1), progress=False)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for key in ("teacher", "distill", "distill_temp"):
        del state["config"][key]
    torch.save(state, path)
    assert [m["epoch"] for m in fit(tiny_cfg(tiny_cifar, tmp_path, resume=True, **kw),
                                    progress=False).history] == [1, 2]


def test_teachers_that_cannot_teach_the_run_are_refused_in_one_line(teacher_ckpt, tiny_cifar, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        fit(tiny_cfg(tiny_cifar, tmp_path / "a", teacher=str(tmp_path / "nope.pt")), progress=False)
    state = load_checkpoint(teacher_ckpt)
    state["config"] = {**state["config"], "arch": "atrous", "width": 0.5}
    from c40.model import create_model
    state["model"], state["ema"] = create_model("atrous", width=0.5).state_dict(), None
    torch.save(state, tmp_path / "atrous.pt")  # needs >= 25 px: no 24-px epochs
    with pytest.raises(ConfigError, match=r"atrous \(the --teacher's\) needs inputs of at least 25 px"):
        fit(tiny_cfg(tiny_cifar, tmp_path / "b", teacher=str(tmp_path / "atrous.pt"),
                     low_res_frac=0.5), progress=False)
    state = load_checkpoint(teacher_ckpt)
    state["classes"] = [f"c{i}" for i in range(10)]
    torch.save(state, tmp_path / "other_classes.pt")
    with pytest.raises(CheckpointError, match="this run's data has"):
        fit(tiny_cfg(tiny_cifar, tmp_path / "c", teacher=str(tmp_path / "other_classes.pt")),
            progress=False)


def test_a_teacher_is_read_from_a_uri(teacher_ckpt):
    """On a cluster the teacher comes from a bucket (any pyarrow filesystem; file:// here)."""
    state = load_checkpoint(f"file://{teacher_ckpt}")
    assert torch.equal(state["model"]["fc.weight"], load_checkpoint(teacher_ckpt)["model"]["fc.weight"])
    with pytest.raises(CheckpointError, match="checkpoint not readable"):
        load_checkpoint(f"file://{teacher_ckpt}.missing")
