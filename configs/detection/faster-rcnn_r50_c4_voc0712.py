# Paper Table 8's own protocol (§6.1, GluonCV): Faster R-CNN with a C4 head, no FPN. The backbone stops after
# stage 3 and ResNet's stage 4 runs on every RoI as the head's shared layer: MMDetection's faster-rcnn_r50-caffe-c4
# model, on VOC07+12 trainval -> VOC07 test (11-point mAP) with the data pipeline and schedule of
# mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py, so this config and faster-rcnn_r50_fpn_voc0712.py differ
# only in the model. python -m detection.train fills the backbone (stem, stages 1-3) and roi_head.shared_head
# (stage 4) from the export and verifies both (transfer/shared_head.py); the C4 recipe's frozen BN stays.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50-caffe-c4.py',
    'mmdet::_base_/datasets/voc0712.py',
    'mmdet::_base_/default_runtime.py',
]

# The stock model loads 'open-mmlab://detectron2/resnet50_caffe' into both parts (a download); the export replaces it.
model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(shared_head=dict(init_cfg=None), bbox_head=dict(num_classes=20)))

# The schedule of mmdet's faster-rcnn_r50_fpn_1x_voc0712.py: voc0712 repeats the data 3 times, so 4 epochs = 12.
max_epochs = 4
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1)]
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
auto_scale_lr = dict(enable=False, base_batch_size=16)  # lr 0.01 is for 8 GPUs x 2 images
# The stage takes the 16 images in one pass on any GPU count, up to this many per GPU (above it: gradient
# accumulation). Stage 4 runs on each image's 512 sampled RoIs, so an image costs 3.4 GiB in training (fp32;
# tools/bench_transfer.py --images-per-gpu 1,2, peak resident memory on a CPU: 4.6 and 8.1 GiB) and 16 take about
# 56 GiB: an 80 GB GPU. For 40 GB ones set 8 (the pretrained arms' BN is frozen, so only the control's BN batch
# changes, and the summary records it).
max_images_per_gpu = 16
