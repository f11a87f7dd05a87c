"""The mmsegmentation 1.x integration against the real mmseg (run by .ci/mmseg-test in its own venv; skipped
where mmseg is not installed). CPU only, small sizes."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmengine")
pytest.importorskip("mmseg")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmcv_ops_standin  # noqa: E402

mmcv_ops_standin.install()  # mmcv-lite: mmseg's models import mmcv.ops

import torch.nn.functional as TF  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import METRICS, MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402
from torch import nn  # noqa: E402

import hss_kernels as hk  # noqa: E402
from hss_kernels.integrations import mmseg as hm  # noqa: E402
from hss_kernels.metrics import HierarchicalMetrics  # noqa: E402

register_all_modules(init_default_scope=True)

ROOT = Path(__file__).resolve().parents[2]
TREE = hk.trees.load("cityscapes")  # 19 leaves, 26 nodes, depth 2
L, V = TREE.num_leaves, TREE.num_nodes
FUNCTIONAL = {"HierarchicalSoftmaxLoss": hk.hierarchical_softmax_loss, "TreeMinLoss": hk.tree_min_loss,
              "TreeBCELoss": hk.tree_bce_loss}
CHANNELS = {"HierarchicalSoftmaxLoss": L, "TreeMinLoss": V, "TreeBCELoss": V}
OPTIONS = {"HierarchicalSoftmaxLoss": {}, "TreeMinLoss": {"gamma": 2.0, "scale": 5.0}, "TreeBCELoss": {}}


@MODELS.register_module(name="_HSSTinyBackbone", force=True)
class TinyBackbone(nn.Module):
    """Stands in for a real backbone: one stride-4 conv, one feature map."""

    def __init__(self, out_channels=8, init_cfg=None):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 3, stride=4, padding=1)

    def init_weights(self):
        pass

    def forward(self, x):
        return (self.conv(x),)


def labels(n=2, h=32, w=32, ignored=0.1):
    y = torch.randint(0, L, (n, h, w))
    y[torch.rand(n, h, w) < ignored] = 255
    return y


def samples(y):
    out = []
    for i in range(y.shape[0]):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=y[i:i + 1].clone())
        shape = tuple(y.shape[-2:])
        s.set_metainfo(dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
        out.append(s)
    return out


def head_cfg(loss, channels, sampler=None, **loss_kw):
    return dict(type="FCNHead", in_channels=8, channels=16, num_convs=1, concat_input=False, num_classes=channels,
                dropout_ratio=0.0, norm_cfg=None, align_corners=False, sampler=sampler,
                loss_decode=dict(type=loss, tree="cityscapes", **loss_kw))


def test_registered_names():
    assert hm.REGISTERED == {n: n for n in ("HierarchicalSoftmaxLoss", "TreeMinLoss", "TreeBCELoss", "TreeTripletLoss",
                                            "HierarchicalEncoderDecoder", "HierarchicalIoUMetric")}
    for name in ("HierarchicalSoftmaxLoss", "TreeMinLoss", "TreeBCELoss", "TreeTripletLoss",
                 "HierarchicalEncoderDecoder"):
        assert MODELS.get(name) is getattr(hm, name)
    assert METRICS.get("HierarchicalIoUMetric") is hm.HierarchicalIoUMetric


@pytest.mark.parametrize("loss", sorted(FUNCTIONAL))
def test_loss_equals_functional(loss):
    cw = torch.rand(L) + 0.5
    mod = MODELS.build(dict(type=loss, tree="cityscapes", loss_weight=0.7, loss_name="loss_x", class_weight=cw.tolist(),
                            **OPTIONS[loss]))
    assert mod.loss_name == "loss_x"
    x = torch.randn(2, CHANNELS[loss], 12, 10, dtype=torch.float64)
    y = labels(2, 12, 10)
    w = torch.rand(2, 12, 10, dtype=torch.float64)
    fn = FUNCTIONAL[loss]
    kw = dict(class_weight=cw, **OPTIONS[loss])
    torch.testing.assert_close(mod(x, y, ignore_index=255), 0.7 * fn(x, y, TREE, **kw))
    torch.testing.assert_close(mod(x, y, weight=w), 0.7 * fn(x, y, TREE, pixel_weight=w, **kw))
    torch.testing.assert_close(mod(x, y, weight=w, reduction_override="none"),
                               0.7 * fn(x, y, TREE, pixel_weight=w, reduction="none", **kw))
    torch.testing.assert_close(mod(x, y, avg_factor=3.0), 0.7 * fn(x, y, TREE, reduction="sum", **kw) / 3.0)
    # low-resolution logits with the fused upsampling (the path HierarchicalEncoderDecoder(fused_upsample=True) takes)
    y2 = labels(2, 24, 20)
    torch.testing.assert_close(mod(x, y2, upsample="bilinear"),
                               0.7 * fn(TF.interpolate(x, size=(24, 20), mode="bilinear"), y2, TREE, **kw))


def test_tree_from_file_and_class_weight_file(tmp_path):
    (tmp_path / "t.txt").write_text(TREE.to_text(), encoding="utf-8")
    cw = tmp_path / "w.json"
    cw.write_text(str([1.0] * L))
    mod = MODELS.build(dict(type="TreeBCELoss", tree=str(tmp_path / "t.txt"), class_weight=str(cw)))
    assert mod.tree.num_nodes == V and mod.loss_name == "loss_tree_bce"
    x, y = torch.randn(1, V, 6, 6), labels(1, 6, 6)
    torch.testing.assert_close(mod(x, y), hk.tree_bce_loss(x, y, TREE))


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown tree 'nonesuch'.*cityscapes"):
        MODELS.build(dict(type="TreeMinLoss", tree="nonesuch"))
    with pytest.raises(ValueError, match=r"class_weight needs one weight per leaf of the tree \(19"):
        MODELS.build(dict(type="TreeMinLoss", tree="cityscapes", class_weight=[1.0] * 5))
    with pytest.raises(ValueError, match="loss_name must start with 'loss_'"):
        MODELS.build(dict(type="HierarchicalSoftmaxLoss", tree="cityscapes", loss_name="hsm"))
    with pytest.raises(TypeError, match="unknown option.*gama"):
        MODELS.build(dict(type="TreeMinLoss", tree="cityscapes", gama=2.0))
    with pytest.raises(ValueError, match="avg_non_ignore=False is not supported"):
        MODELS.build(dict(type="TreeMinLoss", tree="cityscapes", avg_non_ignore=False))
    # a head whose channel count fits neither the leaves nor the nodes
    mod = MODELS.build(dict(type="TreeMinLoss", tree="cityscapes"))
    with pytest.raises(ValueError, match="26 nodes"):
        mod(torch.randn(1, 20, 4, 4), labels(1, 4, 4))
    with pytest.raises(ValueError, match="needs 26 .*or 19"):
        MODELS.build(segmentor_cfg("TreeMinLoss", channels=20))


OHEM = dict(type="OHEMPixelSampler", thresh=None, min_kept=300)


@pytest.mark.parametrize("sampler", [None, OHEM], ids=["plain", "ohem"])
@pytest.mark.parametrize("loss", sorted(FUNCTIONAL))
def test_decode_head_trains_and_matches_functional(loss, sampler):
    torch.manual_seed(0)
    head = MODELS.build(head_cfg(loss, CHANNELS[loss], sampler=sampler, loss_weight=0.5, **OPTIONS[loss]))
    head.init_weights()
    feats = (torch.randn(2, 8, 8, 8),)
    y = labels(2, 32, 32)
    data = samples(y)
    # the loss mmseg computes equals ours on the resized logits (with the sampler's weights), times loss_weight
    with torch.no_grad():
        logits = head.forward(feats)
        out = head.loss_by_feat(logits, data)
        full = TF.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
        weight = head.sampler.sample(full, y[:, None]) if sampler else None
    if sampler:
        assert 0 < int((weight > 0).sum()) < int((y != 255).sum())
    name = head.loss_decode.loss_name
    expected = 0.5 * FUNCTIONAL[loss](full, y, TREE, pixel_weight=weight, **OPTIONS[loss])
    torch.testing.assert_close(out[name], expected)
    # a few steps of training lower it
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    values = []
    for _ in range(8):
        opt.zero_grad()
        losses = head.loss(feats, data, train_cfg=None)
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        total.backward()
        opt.step()
        values.append(float(total.detach()))
    assert all(torch.isfinite(torch.tensor(values)))
    assert values[-1] < values[0], values


def segmentor_cfg(loss, channels=None, fused_upsample=False, **extra):
    channels = CHANNELS[loss] if channels is None else channels
    # a ConfigDict, as a config file gives: mmseg reads test_cfg.mode
    return ConfigDict(type="HierarchicalEncoderDecoder", tree="cityscapes", fused_upsample=fused_upsample,
                data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3, size=(32, 32)),
                backbone=dict(type="_HSSTinyBackbone", out_channels=8),
                decode_head=head_cfg(loss, channels, **OPTIONS[loss]), test_cfg=dict(mode="whole"), **extra)


@pytest.mark.parametrize("loss", ["TreeMinLoss", "TreeBCELoss"])
def test_node_logit_prediction_is_the_best_path(loss):
    torch.manual_seed(0)
    model = MODELS.build(segmentor_cfg(loss)).eval()
    img = torch.randn(2, 3, 32, 32)
    data = samples(labels(2, 32, 32))
    for s in data:
        s.set_metainfo(dict(ori_shape=(40, 36)))  # the original image was larger: the logits are resized to it
    with torch.no_grad():
        out = model.predict(img, data)
        logits = model.inference(img, [s.metainfo for s in data])
    some_differ = False
    for i, s in enumerate(out):
        pred = s.pred_sem_seg.data
        assert pred.shape == (1, 40, 36)
        resized = TF.interpolate(logits[i:i + 1], size=(40, 36), mode="bilinear", align_corners=False)
        torch.testing.assert_close(s.seg_logits.data[None], resized)
        assert torch.equal(pred, hk.decode(resized, TREE))
        some_differ |= not torch.equal(pred, resized.argmax(1))
        assert int(pred.max()) < L
    assert some_differ  # the argmax over node channels would have been something else


def test_leaf_logit_prediction_keeps_the_argmax():
    model = MODELS.build(segmentor_cfg("HierarchicalSoftmaxLoss")).eval()
    img = torch.randn(1, 3, 32, 32)
    data = samples(labels(1, 32, 32))
    with torch.no_grad():
        out = model.predict(img, data)
    assert torch.equal(out[0].pred_sem_seg.data, out[0].seg_logits.data.argmax(0, keepdim=True))


@pytest.mark.parametrize("loss", sorted(FUNCTIONAL))
def test_fused_upsample_hands_the_small_logits_to_the_loss(loss):
    torch.manual_seed(0)
    model = MODELS.build(segmentor_cfg(loss, fused_upsample=True))
    plain = MODELS.build(segmentor_cfg(loss))
    plain.load_state_dict(model.state_dict())
    img = torch.randn(2, 3, 32, 32)
    y = labels(2, 32, 32)
    data = samples(y)
    seen = []
    fn = FUNCTIONAL[loss]

    def spy(x, target, tree, **kw):
        seen.append((tuple(x.shape), kw.get("upsample")))
        return fn(x, target, tree, **kw)

    name = model.decode_head.loss_decode.loss_name
    orig = type(model.decode_head.loss_decode)._fn
    type(model.decode_head.loss_decode)._fn = staticmethod(spy)
    try:
        out = model.loss(img, data)
    finally:
        type(model.decode_head.loss_decode)._fn = orig
    assert seen == [((2, CHANNELS[loss], 8, 8), "bilinear")]  # the head's 1/4-size logits, not resized by mmseg
    with torch.no_grad():
        ref = plain.loss(img, data)
        small = model.decode_head.forward(model.extract_feat(img))
    torch.testing.assert_close(out[f"decode.{name}"], ref[f"decode.{name}"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[f"decode.{name}"].detach(), fn(small, y, TREE, upsample="bilinear", **OPTIONS[loss]))
    pred = hk.decode(small, TREE, size=(32, 32))
    valid = y != 255
    torch.testing.assert_close(out["decode.acc_seg"], ((pred == y) & valid).sum().float() * 100 / valid.sum())
    # and it trains
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(6):
        opt.zero_grad()
        total = sum(v for k, v in model.loss(img, data).items() if "loss" in k)
        total.backward()
        opt.step()
        values.append(float(total.detach()))
    assert values[-1] < values[0], values


def test_fused_upsample_mixin_with_ohem():
    from mmseg.models.decode_heads import FCNHead

    class Head(hm.FusedUpsampleHeadMixin, FCNHead):
        hss_tree = TREE

    cfg = head_cfg("TreeMinLoss", V, sampler=OHEM)
    cfg.pop("type")
    head = Head(**cfg)
    feats = (torch.randn(2, 8, 8, 8),)
    y = labels(2, 32, 32)
    with torch.no_grad():
        small = head.forward(feats)
        out = head.loss_by_feat(small, samples(y))
        full = TF.interpolate(small, size=(32, 32), mode="bilinear")
        weight = head.sampler.sample(full, y[:, None])
    torch.testing.assert_close(out["loss_tree_min"], hk.tree_min_loss(small, y, TREE, upsample="bilinear",
                                                                      pixel_weight=weight))


def test_metric_matches_hierarchical_metrics_and_iou_metric():
    metric = METRICS.build(dict(type="HierarchicalIoUMetric", tree="cityscapes"))
    iou = METRICS.build(dict(type="IoUMetric", iou_metrics=["mIoU"]))
    meta = dict(classes=TREE.leaf_names)
    metric.dataset_meta = meta
    iou.dataset_meta = meta
    ref = HierarchicalMetrics(TREE)
    for _ in range(3):
        y = labels(2, 16, 16)
        truth = y.clone()
        truth[truth == 255] = 0
        pred = torch.where(torch.rand(2, 16, 16) < 0.6, truth, torch.randint(0, L, (2, 16, 16)))
        batch = [dict(pred_sem_seg=dict(data=pred[i:i + 1]), gt_sem_seg=dict(data=y[i:i + 1])) for i in range(2)]
        metric.process({}, batch)
        iou.process({}, batch)
        ref.update(pred, y)
    res = metric.evaluate(6)
    want = ref.compute()
    for d in (1, 2):
        assert res[f"mIoU_d{d}"] == round(100 * want[d]["miou"], 2)
        assert res[f"aAcc_d{d}"] == round(100 * want[d]["pixel_accuracy"], 2)
        assert res[f"mAcc_d{d}"] == round(100 * want[d]["mean_accuracy"], 2)
    assert res["mIoU_d1"] != res["mIoU_d2"]
    base = iou.evaluate(6)
    for k in ("mIoU", "aAcc", "mAcc"):
        assert res[k] == pytest.approx(float(base[k]), abs=0.011), k
    assert res["mIoU"] == res["mIoU_d2"]


def test_metric_refuses_a_dataset_of_another_size():
    metric = METRICS.build(dict(type="HierarchicalIoUMetric", tree="cityscapes"))
    metric.dataset_meta = dict(classes=["a", "b"])
    y = labels(1, 4, 4)
    with pytest.raises(ValueError, match="2 classes but the tree"):
        metric.process({}, [dict(pred_sem_seg=dict(data=y.clamp(max=L - 1)), gt_sem_seg=dict(data=y))])


def test_triplet_loss():
    mod = MODELS.build(dict(type="TreeTripletLoss", tree="cityscapes", loss_weight=0.3, sampling="first"))
    e = torch.randn(2, 8, 8, 8)
    y = labels(2, 32, 32)
    torch.testing.assert_close(mod(e, y), 0.3 * hk.tree_triplet_loss(e, y, TREE, sampling="first"))
    with pytest.raises(ValueError, match="weight map"):
        mod(e, y, weight=torch.ones(2, 32, 32))


def test_example_config_builds_and_runs():
    from mmengine.model import revert_sync_batchnorm

    cfg = Config.fromfile(str(ROOT / "examples" / "mmseg_hssn_cityscapes_tree_min.py"))
    assert cfg.custom_imports.imports == ["hss_kernels.integrations.mmseg"]
    assert cfg.val_evaluator == dict(type="HierarchicalIoUMetric", tree="cityscapes")
    metric = METRICS.build(cfg.test_evaluator)
    assert isinstance(metric, hm.HierarchicalIoUMetric)
    cfg.model.pretrained = None  # no download
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))  # SyncBN needs a process group to train
    assert isinstance(model, hm.HierarchicalEncoderDecoder) and model.fused_upsample
    assert model.decode_head.out_channels == V == model.auxiliary_head.out_channels
    img = torch.randn(2, 3, 64, 64)  # 2: the ASPP's image pooling has batch norm
    y = labels(2, 64, 64)
    data = samples(y)
    losses = model.loss(img, data)
    assert {"decode.loss_tree_min", "aux.loss_tree_min"} <= set(losses)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    model.eval()
    with torch.no_grad():
        out = model.predict(img, data)
    for s in out:
        assert s.pred_sem_seg.data.shape == (1, 64, 64)
        assert torch.equal(s.pred_sem_seg.data, hk.decode(s.seg_logits.data[None], TREE))
