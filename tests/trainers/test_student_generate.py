"""A distilled model refuses sampling arguments it cannot honour (``ExportedModel.generate`` and
the shipped diffusers pipeline): it samples with its own sampler and no guidance, so another
solver or a guidance would otherwise be silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainers.test_export_pipeline import Case, _export, _in_process_pipeline
from trainers.export import check_student_arguments, load_export

CONSISTENCY = {"method": "consistency", "sampler": "consistency", "steps": 2, "guidance": 1.5}
ODE = {"method": "progressive", "sampler": "ode", "steps": 2, "guidance": 1.5}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("students")
    out = {}
    for name, distill in (("consistency", CONSISTENCY), ("ode", ODE), ("flow", None)):
        _export(root / name, Case("sd3", distill=distill), {})
        out[name] = root / name
    return out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance": 3.0}, r"guidance=3.0: this model is distilled \(consistency, 2 steps"),
        ({"solver": "heun"}, "solver='heun': .* own 'consistency' sampler"),
        ({"solver": "euler"}, "solver='euler': .* own 'consistency' sampler"),
    ],
)
def test_a_student_refuses_arguments_it_would_ignore(
    exports: dict[str, Path], kwargs: dict, message: str
) -> None:
    model = load_export(exports["consistency"])
    with pytest.raises(ValueError, match=message):
        model.generate(["a red circle"], [0], **kwargs)


def test_a_student_takes_what_it_honours(exports: dict[str, Path]) -> None:
    model = load_export(exports["consistency"])
    own = model.generate(["a red circle"], [0])  # its own sampler, its distilled steps (2)
    same = model.generate(["a red circle"], [0], steps=2, solver="consistency", guidance=1.0)
    assert torch.equal(own, same)
    ode = load_export(exports["ode"])  # "ode" is Euler: naming euler is honoured
    assert torch.equal(ode.generate(["a"], [0]), ode.generate(["a"], [0], solver="euler"))
    with pytest.raises(ValueError, match="own 'ode' sampler \\(Euler\\)"):
        ode.generate(["a"], [0], solver="heun")


def test_a_flow_model_keeps_its_defaults(exports: dict[str, Path]) -> None:
    model = load_export(exports["flow"])
    default = model.generate(["a"], [0], steps=2)
    assert torch.equal(default, model.generate(["a"], [0], steps=2, solver="euler", guidance=3.0))
    with pytest.raises(ValueError, match="unknown solver"):
        model.generate(["a"], [0], steps=1, solver="rk4")


def test_check_student_arguments() -> None:
    check_student_arguments(CONSISTENCY, None, None)
    check_student_arguments(CONSISTENCY, "consistency", 1.0)
    with pytest.raises(ValueError, match=r"teacher guidance 1\.5 distilled in"):
        check_student_arguments(CONSISTENCY, None, 2.0)


def test_the_shipped_pipeline_refuses_them_too(exports: dict[str, Path]) -> None:
    student = _in_process_pipeline(exports["consistency"])
    with pytest.raises(ValueError, match="solver='euler': this is a distilled student"):
        student(["a"], [0], solver="euler")
    with pytest.raises(ValueError, match=r"guidance_scale=3\.0"):
        student(["a"], [0], guidance_scale=3.0)
    assert student(["a"], [0], output_type="pt").images.shape == (1, 3, 16, 16)
    ode = _in_process_pipeline(exports["ode"])
    assert ode(["a"], [0], solver="euler", output_type="pt").images.shape == (1, 3, 16, 16)
