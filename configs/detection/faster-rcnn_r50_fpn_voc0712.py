# Paper Table 8 with MMDetection's own recipe: Faster R-CNN R-50-FPN, VOC07+12 trainval -> VOC07 test, 1x schedule
# (4 epochs over the 3x repeated set), 11-point VOC07 mAP; MMDetection publishes 79.5 mAP with torchvision's
# ResNet-50. Everything is inherited; python -m detection.train sets the backbone type, pretrained weights and
# input normalisation from the export and the data root, and keeps the recipe's batch and lr on any GPU count.
_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'

# The stock config loads 'torchvision://resnet50' (a download); the export replaces it.
model = dict(backbone=dict(init_cfg=None))
auto_scale_lr = dict(enable=False, base_batch_size=16)  # lr 0.01 is for 8 GPUs x 2 images
# The stage takes the 16 images in one pass on any GPU count, up to this many per GPU (above it: gradient
# accumulation). Measured in fp32 with tools/bench_transfer.py --images-per-gpu 1,2,4 (peak resident memory on a
# CPU: 2.6, 3.5, 5.8 GiB): 1.1 GiB per image at VOC's 1000x600 scale, so 16 take about 19 GiB. Lower it for
# smaller GPUs; on a GPU, measure with the same tool.
max_images_per_gpu = 16
