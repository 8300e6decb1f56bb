# The Table 8 recipe (configs/detection/faster-rcnn_r50_fpn_voc0712.py: same model, frozen stem + stage 1,
# norm_eval, SGD, step decay, VOC07 11-point mAP), shrunk for the embedded data on a CPU: the images of about
# 190x140 px at their own size instead of 1000x600, boxes down to 4 px kept (the stock filter drops < 32 px),
# fewer proposals and sampled RoIs (our images hold a handful of objects), a short schedule, lr for batch 2.
# Measured on the small data (ResNet-50-D demo backbone, 56 % top-1): VOC mAP 11.2 after 80 iterations against
# 0.0 from random init; 56 iterations keep `make demo` within its 15 minutes.
_base_ = '../faster-rcnn_r50_fpn_voc0712.py'
allow_synthetic = True  # the embedded data of tools/make_data.py (read by our stage; mmengine ignores it)

model = dict(
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=250), rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=250)))

scale = (192, 192)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
voc = dict(type='VOCDataset', data_root='data/demo/VOCdevkit', pipeline=train_pipeline,
           filter_cfg=dict(filter_empty_gt=True, min_size=4, bbox_min_size=4))
train_dataloader = dict(
    batch_size=2, num_workers=2,
    dataset=dict(type='RepeatDataset', times=1, dataset=dict(
        type='ConcatDataset', ignore_keys=['dataset_type'], datasets=[
            dict(voc, ann_file='VOC2007/ImageSets/Main/trainval.txt', data_prefix=dict(sub_data_root='VOC2007/')),
            dict(voc, ann_file='VOC2012/ImageSets/Main/trainval.txt', data_prefix=dict(sub_data_root='VOC2012/')),
        ])))
test_dataloader = dict(num_workers=1, dataset=dict(data_root='data/demo/VOCdevkit', pipeline=test_pipeline))
# No validation during these short runs: the stage tests once at the end.
val_dataloader = None
val_evaluator = None
val_cfg = None

# Iteration-based so that the schedule (and the demo's time) does not depend on the dataset size.
max_iters = 56
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters)
train_dataloader.update(sampler=dict(type='InfiniteSampler', shuffle=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='MultiStepLR', begin=0, end=max_iters, by_epoch=False, milestones=[int(max_iters * 0.75)], gamma=0.1),
]
# lr 0.01 at batch 2 (8x the stock rate per image) sent pretrained backbones to NaN within 30 iterations;
# 0.005 with gradient clipping (max_norm 35, as mmdet's Objects365 Faster R-CNN recipe) trains every arm.
optim_wrapper = dict(optimizer=dict(lr=0.005), clip_grad=dict(max_norm=35, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=2)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(by_epoch=False, interval=28))
log_processor = dict(by_epoch=False)
