"""The checkpoint's schema (replica.runs) and the one record of the net (replica.config.NetOptions)."""
import dataclasses

import pytest
import torch

from replica.config import Config, NetOptions, load_config
from replica.errors import ReplicaError
from replica.inference import model_from_checkpoint
from replica.model import AlexNet
from replica.runs import CKPT_FORMAT, Checkpoint, Progress, check_compatible, load_checkpoint, save_checkpoint
from runs_helpers import NARROW


def test_every_net_option_is_a_config_key_with_the_same_default():
    """A YAML file or key=value sets each of them, and a default config is the default net."""
    config = {f.name: f.default for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(NetOptions):
        assert f.name in config and config[f.name] == f.default, f.name
    assert Config().net == NetOptions()
    cfg = load_config(None, ["preset=paper-text", "norm=false", f"width={NARROW}", "init=caffe"])
    assert cfg.net == NetOptions(preset="paper-text", norm=False, width=NARROW, init="caffe")


def test_a_bad_net_option_is_refused_by_the_config_and_by_the_net_alike():
    for key, value, said in (("preset", "caffee", "preset: expected one of"), ("width", 0, "width: expected a positive"),
                             ("variant", "one", "variant: expected one of")):
        with pytest.raises(ReplicaError, match=said):
            load_config(None, {key: value})
        with pytest.raises(ReplicaError, match=said):
            NetOptions(**{key: value})


def small_net(**options):
    torch.manual_seed(0)
    return AlexNet(5, "cpu", width=NARROW, **options).eval()


def test_a_checkpoint_round_trip_keeps_every_field(tmp_path):
    model = small_net(norm=False, dropout=False)
    ck = Checkpoint(net=model.opts, classes=list("abcde"), names=["A", "B", "C", "D", "E"], dataset="ilsvrc2012",
                    crop=224, model=model.state_dict(), mean=torch.rand(3, 256, 256) * 255, config=dict(seed=3),
                    progress=Progress(epoch=2, in_epoch=1, step=9, best=0.5, records=[dict(epoch=1)],
                                      partial=dict(loss_sum=1.0, loss_n=1, seen=4, skipped=0, seconds=2.0)),
                    rng=[dict(x=1)], source=dict(file="w.caffemodel"))
    save_checkpoint(tmp_path / "c.pt", ck)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back.path == tmp_path / "c.pt"
    for f in dataclasses.fields(Checkpoint):
        if f.name in ("model", "mean", "path"):
            continue
        assert getattr(back, f.name) == getattr(ck, f.name), f.name
    assert torch.equal(back.mean, ck.mean) and all(torch.equal(back.model[k], v) for k, v in ck.model.items())


def version_1(model: AlexNet, width_known: bool = True) -> dict:
    """A checkpoint as replica wrote it before the net's options were one record (version 1)."""
    o = model.opts
    meta = dict(num_classes=model.num_classes, variant=o.variant, preset=o.preset, norm=o.norm, overlap=o.overlap,
                dropout=o.dropout, classes=list("abcde"), names=None, dataset=None, crop=224)
    if width_known:  # the oldest version-1 files had neither key
        meta.update(init=o.init, width=o.width)
    return dict(format=CKPT_FORMAT, version=1, meta=meta, config=dict(bf16=False), model=model.state_dict(),
                velocity={}, schedule={}, progress=dict(epoch=1, in_epoch=0, step=3, best=0.25, done=True, records=[]),
                rng=[], mean=torch.zeros(3, 256, 256), pca={})


def test_a_version_1_checkpoint_still_loads_and_rebuilds_the_same_net(tmp_path):
    x = torch.randn(2, 3, 224, 224)
    for options, width_known in ((dict(overlap=False, preset="paper-text"), True), (dict(norm=False), True)):
        model = small_net(**options)
        torch.save(version_1(model, width_known), tmp_path / "old.pt")
        ck = load_checkpoint(tmp_path / "old.pt")
        assert ck.net == model.opts and ck.classes == list("abcde") and ck.progress.step == 3 and ck.progress.done
        with torch.no_grad():
            torch.testing.assert_close(model_from_checkpoint(ck, "cpu")(x), model(x), rtol=0, atol=0)
    full = AlexNet(5, "cpu")  # an oldest file: no width or init key means the paper's width, the preset's init
    torch.save(version_1(full, width_known=False), tmp_path / "oldest.pt")
    assert load_checkpoint(tmp_path / "oldest.pt").net == NetOptions()


@pytest.mark.parametrize("change", [dict(width=0.5), dict(dropout=False), dict(init="caffe"), dict(overlap=False),
                                    dict(preset="paper-text"), dict(variant="one-gpu-half"), dict(norm=False)])
def test_resume_refuses_a_checkpoint_of_another_net_whichever_option_differs(change):
    ck = Checkpoint(net=NetOptions(), classes=list("abcd"), model={}, mean=None)
    key, value = next(iter(change.items()))
    with pytest.raises(ReplicaError, match=f"checkpoint has {key}=.*but this run has {key}={value!r}"):
        check_compatible(ck, NetOptions(**change), list("abcd"), "last.pt")
    check_compatible(ck, NetOptions(), list("abcd"), "last.pt")  # the same net: accepted
    with pytest.raises(ReplicaError, match="num_classes=4, but this run has num_classes=3"):
        check_compatible(ck, NetOptions(), list("abc"), "last.pt")
    with pytest.raises(ReplicaError, match="other classes"):
        check_compatible(ck, NetOptions(), list("abdc"), "last.pt")


def test_each_switch_geometry_is_declared_once_on_net_options():
    """overlap's pools and pads, and the LRN count the export checks, come from NetOptions: the
    model's pools and output sizes and the export all read these properties."""
    from replica.model import output_sizes

    on, off = NetOptions(), NetOptions(overlap=False)
    assert (on.pool, on.conv_pads, off.pool, off.conv_pads) == ((3, 2, False), (2, 1), (2, 2, True), (1, 0))
    assert output_sizes(off) == output_sizes(False) and output_sizes(off)["pool5"] == output_sizes(on)["pool5"] == 6
    assert [NetOptions(**kw).lrn_layers for kw in ({}, dict(variant="one-gpu-half"), dict(norm=False))] == [4, 2, 0]
    m = AlexNet.from_options(NetOptions(overlap=False, width=NARROW), 10, "cpu")
    assert m._pool() == (2, 2, 0, 1, True) and m.tower_a.conv2.padding == (1, 1) and m.tower_a.conv5.padding == (0, 0)
