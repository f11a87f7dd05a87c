# HSSN-style hierarchical segmentation of Cityscapes in mmsegmentation 1.x with hss_kernels' focal tree-min
# loss: DeepLabV3+ (ResNet-101, output stride 8), one logit per node of the Cityscapes tree (19 classes
# under 7 groups: 26 nodes), the best root-to-leaf path as the prediction, mIoU at both depths.
#
#   pip install hss_kernels, then mmsegmentation 1.x (see the README's "mmsegmentation" section)
#   python tools/train.py examples/mmseg_hssn_cityscapes_tree_min.py   # mmsegmentation's tools/train.py
#
# The data set, schedule and runtime are mmsegmentation's DeepLabV3+ Cityscapes config's (data/cityscapes,
# 80k iterations, 4 GPUs x 2 images).
_base_ = ["mmseg::deeplabv3plus/deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024.py"]

# importing the integration registers the losses, the segmentor and the metric
custom_imports = dict(imports=["hss_kernels.integrations.mmseg"], allow_failed_imports=False)

tree = "cityscapes"  # a shipped tree's name or the path of a tree file; hss_kernels.trees.load(tree)
num_nodes = 26       # hss_kernels.trees.load("cityscapes").num_nodes: leaves (label ids 0-18) then the groups

model = dict(
    type="HierarchicalEncoderDecoder",
    tree=tree,
    # the heads' 1/8-size logits go to the loss as they are (upsample="bilinear", fused in the native
    # kernels) instead of being resized to 512x1024 first
    fused_upsample=True,
    # _delete_: replace the base config's CrossEntropyLoss dict instead of merging into it
    decode_head=dict(
        num_classes=num_nodes,
        loss_decode=dict(_delete_=True, type="TreeMinLoss", tree=tree, gamma=2.0, scale=5.0, loss_weight=1.0,
                         loss_name="loss_tree_min")),
    auxiliary_head=dict(
        num_classes=num_nodes,
        loss_decode=dict(_delete_=True, type="TreeMinLoss", tree=tree, gamma=2.0, scale=5.0, loss_weight=0.4,
                         loss_name="loss_tree_min")),
)

# mIoU (leaves, as IoUMetric), mIoU_d1 (the 7 groups), mIoU_d2, and aAcc_d*/mAcc_d*
val_evaluator = dict(_delete_=True, type="HierarchicalIoUMetric", tree=tree)
test_evaluator = val_evaluator
