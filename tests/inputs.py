"""Small input batches for the tiny model, made with the real HF processor."""

from __future__ import annotations

from PIL import Image, ImageDraw

from llava_manager.testing.tiny import tiny_processor


def picture(width: int, height: int, colour: str = "red", seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (width, height), (20 + 40 * seed % 200, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 5, height // 5, width // 2, height // 2], fill=colour)
    draw.rectangle([width // 2, height // 2, width - 2, height - 2], fill="blue")
    return image


def prompt(processor, question: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def single_image_batch(processor=None, size=(50, 30), question="What color is the circle?"):
    processor = processor or tiny_processor()
    return processor(images=[picture(*size)], text=prompt(processor, question, 1), return_tensors="pt")


def multi_image_batch(processor=None):
    processor = processor or tiny_processor()
    text = prompt(processor, "Which image is larger?", 2)
    return processor(images=[[picture(50, 30), picture(40, 70, "green", 1)]], text=[text], return_tensors="pt")


def text_only_batch(processor=None):
    processor = processor or tiny_processor()
    texts = [prompt(processor, "What is a circle?", 0), prompt(processor, "Count to three.", 0)]
    return processor(text=texts, return_tensors="pt", padding=True)


def two_image_prompts_batch(processor=None):
    """Two samples, one image each, different sizes, left padded (for generation)."""
    processor = processor or tiny_processor()
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor, "What color is the circle?", 1), prompt(processor, "Where?", 1)]
    return processor(
        images=[picture(50, 30), picture(70, 90, "green", 1)], text=texts, return_tensors="pt", padding=True
    )


def clip(frames: int = 3, size: int = 40, seed: int = 0):
    """A synthetic video: `frames` RGB frames (frames, size, size, 3) of a square moving right on noise."""
    import numpy as np

    rng = np.random.RandomState(seed)
    video = rng.randint(0, 80, (frames, size, size, 3), dtype=np.uint8)
    for index in range(frames):
        left = index * (size // 2) // max(1, frames - 1)
        video[index, size // 4 : size // 4 + size // 3, left : left + size // 3] = (220, 40, 40)
    return video


def video_prompt(processor, question: str, images: int = 0, videos: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def video_batch(processor=None, frames: int = 3, question: str = "Where does the square move?"):
    processor = processor or tiny_processor()
    return processor(videos=[clip(frames)], text=video_prompt(processor, question), return_tensors="pt")


def mixed_media_batch(processor=None):
    """Four samples, left padded: an image, a video (4 frames), text only, and an image with a video."""
    processor = processor or tiny_processor()
    processor.tokenizer.padding_side = "left"
    texts = [
        prompt(processor, "What color is the circle?", 1),
        video_prompt(processor, "Where does the square move?"),
        prompt(processor, "Count to three.", 0),
        video_prompt(processor, "Is the circle in the video?", images=1),
    ]
    return processor(
        images=[picture(50, 30), picture(40, 70, "green", 1)],
        videos=[clip(4), clip(4, seed=1)],
        text=texts,
        return_tensors="pt",
        padding=True,
    )


def write_mp4(path, video):
    """Encode `video` (F, H, W, 3) uint8 as an MP4 with PyAV (lossy: decoded frames differ slightly)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
