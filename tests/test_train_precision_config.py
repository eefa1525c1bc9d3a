"""train.precision accepts fp16 and names itself when wrong; the fp16 grad scaler's state survives
a checkpoint (saved by ``save_checkpoint``, read back with ``weights_only=True``). No Ray."""

import pytest
import torch

from pipeline.checkpoints import load_state, save_checkpoint
from pipeline.config import ConfigError, DinoConfig


def test_precision_field_takes_fp16_and_names_a_bad_value():
    assert DinoConfig.load(None, ["train.precision=fp16"]).train.precision == "fp16"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        DinoConfig.load(None, ["train.precision=fp8"])


@pytest.mark.parametrize("with_scaler", [True, False])
def test_scaler_state_round_trips_through_a_checkpoint(tmp_path, with_scaler):
    cfg = DinoConfig()
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = None
    if with_scaler:
        scaler = torch.amp.GradScaler(device="cpu", init_scale=1024.0, growth_interval=7)
        net.weight.grad = torch.full_like(net.weight, float("inf"))
        scaler.scale(torch.ones(()))  # creates S on the device
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()  # inf gradient: S backs off, the state is no longer the default
    save_checkpoint(
        tmp_path,
        student=net,
        teacher=net,
        center=torch.zeros(1, 2),
        optimizer=opt,
        epoch=0,
        global_step=1,
        iters_per_epoch=1,
        cfg=cfg,
        scaler=scaler,
    )
    state = load_state(tmp_path)  # weights_only=True
    if not with_scaler:
        assert state["scaler"] is None
        return
    restored = torch.amp.GradScaler(device="cpu")
    restored.load_state_dict(state["scaler"])
    assert restored.get_scale() == scaler.get_scale() < 1024.0
    assert restored.get_growth_interval() == 7
