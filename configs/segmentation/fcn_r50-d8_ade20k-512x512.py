# Paper Table 9 with MMSegmentation's own recipe: FCN, ResNet-50 dilated in stages 3 and 4 (output stride 8),
# ADE20K 512x512 crops, 80k iterations, batch 16, single-scale test; MMSegmentation publishes 35.94 mIoU with
# ResNetV1c. python -m segmentation.train sets the backbone type (A/B/C/D -> ResNet/ResNetV1c/ResNetV1d) and
# pretrained weights from the export and clears the stock 'pretrained' URL; dilations/strides stay as here.
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py'

model = dict(pretrained=None)
auto_scale_lr = dict(enable=False, base_batch_size=16)  # lr 0.01 is for 4 GPUs x 4 images
# The stage runs the 16 crops in one pass on any GPU count (SyncBN over all of them, as the recipe's 4 x 4), up to
# this many per GPU; above it, gradient accumulation (a smaller BN batch, recorded). Measured in fp32 with
# tools/bench_transfer.py --images-per-gpu 1,2,4 (peak resident memory on a CPU: 3.1, 5.0, 8.3 GiB; mmseg's own
# log states 8.5 GB on a GPU for 4): 1.7 GiB per 512x512 crop, so 16 take about 29 GiB, within a 40 or 80 GB GPU.
# Lower it for smaller ones (24 GB: 8); on a GPU, measure with the same tool.
max_images_per_gpu = 16
