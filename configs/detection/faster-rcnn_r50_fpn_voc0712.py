# Paper Table 8 with MMDetection's own recipe: Faster R-CNN R-50-FPN, VOC07+12 trainval -> VOC07 test, 1x schedule
# (4 epochs over the 3x repeated set), 11-point VOC07 mAP; MMDetection publishes 79.5 mAP with torchvision's
# ResNet-50. Everything is inherited; python -m detection.train sets the backbone type, pretrained weights and
# input normalisation from the export, the data root, and scales the lr to the batch actually used.
_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'

# The stock config loads 'torchvision://resnet50' (a download); the export replaces it.
model = dict(backbone=dict(init_cfg=None))
auto_scale_lr = dict(enable=False, base_batch_size=16)  # lr 0.01 is for 8 GPUs x 2 images
