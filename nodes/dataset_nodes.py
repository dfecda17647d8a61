"""Dataset nodes: images from a folder / the graph / a kohya TOML, and kohya bucketing + captions."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from comfy_api.latest import io

from ..trainer.comfyui import services as comfy_services
from ..trainer.data.assemble import dataset_from_scan, dataset_from_toml, with_reg_images
from ..trainer.data.buckets import BucketSettings
from ..trainer.data.captions import CaptionOptions
from ..trainer.data.sources import (
    ScanOptions,
    ScanResult,
    folder_fingerprint,
    items_from_images,
    resolve_dataset_path,
    scan_folder,
    scan_metadata_jsonl,
)
from ..trainer.report_images import bucket_histogram_image
from .common import CATEGORY, pil_to_image
from .sockets import DatasetSocket, ImagesSocket

LAYOUTS = ["auto", "captions beside images", "metadata.jsonl"]
#: How a graph MASK becomes the loss weight: LoadImage's MASK is 1 - alpha, so "1 - mask" trains the opaque pixels
MASK_MEANINGS = ["1 - mask (opaque pixels train, as kohya alpha_mask)", "mask (masked pixels train)"]


def dataset_outputs(ds) -> io.NodeOutput:
    report = ds.report_text()
    histogram = pil_to_image(bucket_histogram_image(ds.bucket_histogram()))
    return io.NodeOutput(ds, report, histogram, json.dumps(ds.report_json(), indent=1), ui={"text": [report]})


class ImagesFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraImagesFromFolder",
            display_name="SDXL LoRA: Images from Folder",
            category=f"{CATEGORY}/dataset",
            description="Scans a folder of training images with captions, the way you prepared it for kohya "
            "(N_name subfolders = N repeats, captions in .txt files beside the images) or with a "
            "metadata.jsonl (file_name, text). Bad files are skipped with a reason in the report.",
            inputs=[
                io.String.Input(
                    "folder",
                    default="",
                    tooltip="The image folder. Absolute, or relative to ComfyUI's "
                    "input directory. kohya layout: subfolders named '10_name' are repeated 10 times.",
                ),
                io.Combo.Input(
                    "layout",
                    options=LAYOUTS,
                    default="auto",
                    tooltip="auto: metadata.jsonl if the folder has one, else captions beside the images.",
                ),
                io.String.Input(
                    "caption_extension",
                    default=".txt",
                    tooltip="Extension of the caption file beside "
                    "each image (kohya: caption_extension), e.g. .txt or .caption.",
                ),
                io.Int.Input(
                    "default_repeats",
                    default=1,
                    min=1,
                    max=10000,
                    tooltip="Repeats for images that are not inside an 'N_name' subfolder.",
                ),
                io.Boolean.Input("recursive", default=True, tooltip="Also scan subfolders of subfolders."),
                io.Boolean.Input(
                    "strict_captions",
                    default=False,
                    tooltip="Stop with an error when an image has "
                    "no caption file (otherwise: empty caption and a warning).",
                ),
                io.Boolean.Input(
                    "exif_transpose",
                    default=True,
                    tooltip="Apply the EXIF orientation of photos. "
                    "kohya does not; turn off to train exactly what kohya would.",
                ),
                io.Boolean.Input(
                    "alpha_mask",
                    default=False,
                    optional=True,
                    tooltip="Masked loss from transparency (kohya alpha_mask): each image's alpha channel says which "
                    "pixels count (0 = ignored); the colour under it is trained as stored, not put on white. Images "
                    "without alpha count whole.",
                ),
                io.String.Input(
                    "mask_folder",
                    default="",
                    optional=True,
                    tooltip="Masked loss from mask images (kohya masked_loss with conditioning_data_dir): a folder "
                    "with one mask per image, same file name (any image extension), same size; its RED channel is "
                    "the weight (black = ignored). Subfolders may mirror the image folder's. Empty = no masks.",
                ),
                io.String.Input(
                    "reg_folder",
                    default="",
                    optional=True,
                    tooltip="Regularization (class) images, kohya reg_data_dir: 'N_class' subfolders (N repeats), "
                    "captions beside the images. kohya balances their repeats against the training images; their "
                    "loss is weighted by prior_loss_weight (Loss & Noise). Empty = none.",
                ),
            ],
            outputs=[
                ImagesSocket.Output(display_name="images", tooltip="Images and captions, ready for bucketing."),
                io.String.Output(display_name="report", tooltip="Counts, repeats, skipped files, warnings."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, mask_folder: str = "", reg_folder: str = "", **_: object) -> str:
        """Re-scan when files in the folders change (an edited caption keeps the same folder path)."""
        input_dir = comfy_services.input_directory()
        prints = [folder_fingerprint(f, input_dir) for f in (folder, mask_folder, reg_folder) if f.strip()]
        return "|".join(prints)

    @classmethod
    def validate_inputs(cls, alpha_mask: bool = False, mask_folder: str = "") -> bool | str:
        if alpha_mask and mask_folder.strip():
            return (
                "alpha_mask and mask_folder are both set; the mask comes from one of them: turn alpha_mask off to "
                "use the mask images, or clear mask_folder to use the alpha channel."
            )
        return True

    @classmethod
    def execute(
        cls,
        folder: str,
        layout: str,
        caption_extension: str,
        default_repeats: int,
        recursive: bool,
        strict_captions: bool,
        exif_transpose: bool,
        alpha_mask: bool = False,
        mask_folder: str = "",
        reg_folder: str = "",
    ) -> io.NodeOutput:
        input_dir = comfy_services.input_directory()
        root, _ = resolve_dataset_path(folder, input_dir)
        use_jsonl = layout == "metadata.jsonl" or (
            layout == "auto" and os.path.isfile(os.path.join(root, "metadata.jsonl"))
        )
        options = ScanOptions(
            caption_extension=caption_extension,
            recursive=recursive,
            strict_captions=strict_captions,
            exif_transpose=exif_transpose,
        )
        masked = replace(options, alpha_mask=alpha_mask, mask_dir=mask_folder.strip() or None)
        if use_jsonl:
            scan = scan_metadata_jsonl(folder, input_dir, masked, default_repeats=default_repeats)
        else:
            scan = scan_folder(folder, input_dir, masked, default_repeats=default_repeats)
        if reg_folder.strip():
            scan = with_reg_images(scan, scan_folder(reg_folder, input_dir, options, is_reg=True))
        report = scan.report_text()
        return io.NodeOutput(scan, report, ui={"text": [report]})


class ImagesFromGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraImagesFromGraph",
            display_name="SDXL LoRA: Images from Graph",
            category=f"{CATEGORY}/dataset",
            description="Turns IMAGEs from the canvas (a batch, or a list of differently sized images) into "
            "training images with captions.",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="IMAGE batch or list (e.g. from Load Image nodes)."),
                io.String.Input(
                    "captions",
                    multiline=True,
                    default="",
                    tooltip="One caption per line, one line per image in order; a single line is used for every image.",
                ),
                io.String.Input("name", default="images", tooltip="Subset name shown in reports and metadata."),
                io.Int.Input(
                    "repeats",
                    default=1,
                    min=1,
                    max=10000,
                    tooltip="How often each image is repeated per epoch (kohya num_repeats).",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Masked loss: one MASK per image, in the same order and at its size (e.g. the MASK of "
                    "the Load Image node that gives the image: its alpha, or what the mask editor painted).",
                ),
                io.Combo.Input(
                    "mask_meaning",
                    options=MASK_MEANINGS,
                    default=MASK_MEANINGS[0],
                    optional=True,
                    tooltip="Which pixels train. Load Image's MASK is 1 - alpha: '1 - mask' trains the opaque "
                    "pixels (kohya alpha_mask); 'mask' trains the pixels the mask covers (painted in the mask "
                    "editor, or a segmentation of the subject).",
                ),
            ],
            outputs=[
                ImagesSocket.Output(display_name="images", tooltip="Images and captions, ready for bucketing."),
                io.String.Output(display_name="report", tooltip="Counts and warnings."),
            ],
        )

    @classmethod
    def execute(
        cls,
        images: list,
        captions: list[str],
        name: list[str],
        repeats: list[int],
        mask: list | None = None,
        mask_meaning: list[str] | None = None,
    ) -> io.NodeOutput:
        lines = [line for text in captions for line in text.split("\n")]
        if lines and lines[-1] == "":
            lines = lines[:-1]
        caption_arg = lines[0] if len(lines) == 1 else lines
        invert = (mask_meaning or MASK_MEANINGS)[0] == MASK_MEANINGS[0]
        scan = items_from_images(
            list(images), caption_arg, name=name[0], num_repeats=repeats[0], masks=mask, invert_masks=invert
        )
        report = scan.report_text()
        return io.NodeOutput(scan, report, ui={"text": [report]})


class Buckets(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraBuckets",
            display_name="SDXL LoRA: Buckets & Captions",
            category=f"{CATEGORY}/dataset",
            description="kohya's aspect-ratio bucketing, SDXL size conditioning and caption options. The report "
            "shows per-bucket counts and steps per epoch, exactly as kohya would train.",
            inputs=[
                ImagesSocket.Input("images", tooltip="From 'Images from Folder' or 'Images from Graph'."),
                io.Int.Input(
                    "resolution_width",
                    default=1024,
                    min=64,
                    max=8192,
                    step=32,
                    tooltip="Training resolution width (kohya resolution). The bucket area is width x height.",
                ),
                io.Int.Input(
                    "resolution_height", default=1024, min=64, max=8192, step=32, tooltip="Training resolution height."
                ),
                io.Boolean.Input(
                    "enable_bucket",
                    default=True,
                    tooltip="Aspect-ratio buckets. Off: one bucket = the resolution; another size is scaled "
                    "to cover it and centre-cropped (kohya's cached-latent path).",
                ),
                io.Int.Input("min_bucket_reso", default=256, min=32, max=8192, tooltip="Smallest bucket side."),
                io.Int.Input("max_bucket_reso", default=2048, min=64, max=16384, tooltip="Largest bucket side."),
                io.Int.Input(
                    "bucket_reso_steps",
                    default=64,
                    min=32,
                    max=1024,
                    step=32,
                    tooltip="Bucket sides are multiples of this (SDXL needs a multiple of 32).",
                ),
                io.Boolean.Input(
                    "bucket_no_upscale",
                    default=False,
                    tooltip="Never upscale: buckets come from the images' own sizes (kohya bucket_no_upscale).",
                ),
                io.Int.Input(
                    "batch_size", default=1, min=1, max=256, tooltip="Images per batch; batches never mix buckets."
                ),
                io.Boolean.Input(
                    "flip_aug", default=False, tooltip="Random horizontal flips (the flipped latent is cached too)."
                ),
                io.Combo.Input(
                    "crop_conditioning",
                    options=["kohya", "true crop"],
                    default="kohya",
                    tooltip="SDXL crop_top_left numbers: kohya's (what kohya trains with; not the real "
                    "crop) or the true centre-crop offsets.",
                ),
                io.Boolean.Input("shuffle_caption", default=False, tooltip="Shuffle comma-separated tags every step."),
                io.Int.Input(
                    "keep_tokens",
                    default=0,
                    min=0,
                    max=255,
                    tooltip="Keep this many leading tags in place when shuffling.",
                ),
                io.String.Input(
                    "keep_tokens_separator",
                    default="",
                    tooltip="Tags before this separator stay fixed (kohya keep_tokens_separator, e.g. |||).",
                ),
                io.Float.Input(
                    "caption_dropout_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability of training a sample with an empty caption.",
                ),
                io.Float.Input(
                    "caption_tag_dropout_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability of dropping each (non-kept) tag.",
                ),
                io.String.Input("caption_prefix", default="", tooltip="Text put before every caption."),
                io.String.Input("caption_suffix", default="", tooltip="Text put after every caption."),
                io.Float.Input(
                    "validation_split",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="Share of each subset's images held out for the validation loss (kohya validation_split; "
                    "reg images are never held out). They are cached but never trained on. 0 = none.",
                ),
                io.Int.Input(
                    "validation_seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    optional=True,
                    control_after_generate=io.ControlAfterGenerate.fixed,
                    tooltip="Seed of kohya's shuffle that picks the held-out images (kohya validation_seed).",
                ),
            ],
            outputs=[
                DatasetSocket.Output(
                    display_name="dataset", tooltip="The bucketed dataset for the cache and train nodes."
                ),
                io.String.Output(
                    display_name="report", tooltip="Images, repeats, buckets, steps per epoch, skipped files."
                ),
                io.Image.Output(display_name="bucket_histogram", tooltip="Images per bucket as a chart."),
                io.String.Output(
                    display_name="details_json", tooltip="Per-image bucket, resize, crop and time_ids as JSON."
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        images: ScanResult,
        resolution_width: int,
        resolution_height: int,
        enable_bucket: bool,
        min_bucket_reso: int,
        max_bucket_reso: int,
        bucket_reso_steps: int,
        bucket_no_upscale: bool,
        batch_size: int,
        flip_aug: bool,
        crop_conditioning: str,
        shuffle_caption: bool,
        keep_tokens: int,
        keep_tokens_separator: str,
        caption_dropout_rate: float,
        caption_tag_dropout_rate: float,
        caption_prefix: str,
        caption_suffix: str,
        validation_split: float = 0.0,
        validation_seed: int = 0,
    ) -> io.NodeOutput:
        settings = BucketSettings(
            (resolution_width, resolution_height),
            min_bucket_reso,
            max_bucket_reso,
            bucket_reso_steps,
            bucket_no_upscale,
            enable_bucket,
        )
        options = CaptionOptions(
            shuffle_caption=shuffle_caption,
            keep_tokens=keep_tokens,
            keep_tokens_separator=keep_tokens_separator,
            caption_prefix=caption_prefix,
            caption_suffix=caption_suffix,
            caption_dropout_rate=caption_dropout_rate,
            caption_tag_dropout_rate=caption_tag_dropout_rate,
        )
        ds = dataset_from_scan(
            images,
            settings,
            batch_size,
            options,
            flip_aug,
            crop_conditioning == "true crop",
            validation_split=validation_split,
            validation_seed=validation_seed,
        )
        return dataset_outputs(ds)


class DatasetFromToml(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraDatasetFromToml",
            display_name="SDXL LoRA: Dataset from kohya TOML",
            category=f"{CATEGORY}/dataset",
            description="Loads a kohya dataset config ([general], [[datasets]], [[datasets.subsets]]) as kohya "
            "would, bucketed per dataset. Unknown keys are reported, not silently dropped.",
            inputs=[
                io.String.Input(
                    "toml_path",
                    default="",
                    tooltip="Path of the dataset .toml. Relative paths resolve "
                    "against ComfyUI's input directory; image_dir inside it against the TOML's folder.",
                ),
                io.Boolean.Input(
                    "strict_captions", default=False, tooltip="Stop with an error when an image has no caption file."
                ),
                io.Boolean.Input("exif_transpose", default=True, tooltip="Apply EXIF orientation (kohya does not)."),
                io.Combo.Input(
                    "crop_conditioning",
                    options=["kohya", "true crop"],
                    default="kohya",
                    tooltip="SDXL crop_top_left numbers: kohya's or the true crop offsets.",
                ),
            ],
            outputs=[
                DatasetSocket.Output(display_name="dataset", tooltip="The bucketed dataset."),
                io.String.Output(display_name="report", tooltip="Images, repeats, buckets, steps per epoch, warnings."),
                io.Image.Output(display_name="bucket_histogram", tooltip="Images per bucket as a chart."),
                io.String.Output(display_name="details_json", tooltip="Per-image details as JSON."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, toml_path: str, **_: object) -> str:
        """Re-load when the TOML or the files next to it change."""
        input_dir = comfy_services.input_directory()
        try:
            path, _ = resolve_dataset_path(toml_path, input_dir)
        except ValueError:
            return "unresolvable"
        return folder_fingerprint(path.parent, input_dir)

    @classmethod
    def execute(
        cls, toml_path: str, strict_captions: bool, exif_transpose: bool, crop_conditioning: str
    ) -> io.NodeOutput:
        input_dir = comfy_services.input_directory()
        path, _ = resolve_dataset_path(toml_path, input_dir)
        ds, _ = dataset_from_toml(
            str(path),
            input_dir,
            strict_captions=strict_captions,
            exif_transpose=exif_transpose,
            true_crop=crop_conditioning == "true crop",
        )
        return dataset_outputs(ds)


NODES = [ImagesFromFolder, ImagesFromGraph, Buckets, DatasetFromToml]
