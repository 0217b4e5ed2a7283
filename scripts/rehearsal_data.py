"""The world the cluster rehearsal (scripts/rehearse_cluster.sh) runs in, made offline: the paper recipes' metadata
in each real format, their images on a web server on 127.0.0.1, the local-folder data sets in their real layouts,
and a small CLIP text model with random weights saved as a Hugging Face folder.

    python scripts/rehearsal_data.py WORK --web http://127.0.0.1:PORT     # writes the files below; WORK/web is
    python -m http.server PORT --bind 127.0.0.1 --directory WORK/web      # the web its metadata points at

    WORK/metadata/Train_GCC-training.tsv        CC3M's TSV: caption<TAB>url, no header row
    WORK/metadata/cc12m.tsv                     CC12M's TSV: url<TAB>caption, no header row
    WORK/metadata/relaion-parquet/*.parquet     LAION's parquet: URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark
    WORK/datasets/cub200/                       CUB-200-2011 with Reed et al.'s text_c10 captions and testclasses.txt
    WORK/datasets/oxford102/                    Oxford-102 flowers, the same caption layout
    WORK/datasets/mscoco/                       MSCOCO 2014: annotations/captions_{train,val}2014.json, train2014/, val2014/
    WORK/clip-vit-tiny/                         transformers' CLIPTextModel (width 64, 2 layers, OpenAI's quick_gelu,
                                                CLIP's 49,408-token vocabulary) + CLIPTokenizer on CLIP's own BPE merges

The pictures are Twemoji's (the emoji each caption names), one picture per row. The rows of the URL-keyed
recipes are named so that some of them fall in the held-out split at each recipe's own test_fraction; the
LAION rows include ones its filters drop (no cartoon word, too small, low similarity), and every table a row
whose image is missing (404), so every accounting path is walked.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline.emoji_source import SKIN_TONE, asset_folder, describe
from vqd.images import is_heldout

# rows of each URL-keyed recipe, and how many of them are held out (the recipes' test_fraction is tiny: the names
# below are searched so that these land in the test split)
TABLES = {"cc3m": (56, 8, 0.005), "cc12m": (24, 4, 0.002), "laion-cartoon": (24, 4, 0.005)}
FOLDERS = {"cub200": 16, "oxford102": 16, "mscoco": 16}  # images of each local-folder data set
CLIP_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}


def emoji_pictures(n: int) -> list[tuple[str, Image.Image]]:
    """n (caption forms, RGB 72 x 72 picture on white) of distinct emoji without skin tones, in file order."""
    out = []
    for png in sorted(asset_folder().glob("*.png")):
        row = describe(png.stem)
        if row is None or SKIN_TONE.search(row["caption"]) or "-" in png.stem:
            continue
        with Image.open(png) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.append(([row["captions"][0], row["caption"]], Image.alpha_composite(white, rgba).convert("RGB")))
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} emoji pictures, {n} wanted")


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def web_rows(web: Path, base: str, recipe: str, pictures, heldout: int, fraction: float) -> list[tuple[str, list[str]]]:
    """Put each picture on the web server under a name whose URL hashes into the test split for the first
    `heldout` of them and into train for the rest; (url, captions) per picture."""
    rows = []
    for i, (captions, im) in enumerate(pictures):
        want_test, attempt = i < heldout, 0
        while True:
            name = f"{recipe}/{i:04d}-{attempt}.jpg"
            if is_heldout(f"{base}/{name}", fraction) == want_test:
                break
            attempt += 1
        (web / name).parent.mkdir(parents=True, exist_ok=True)
        (web / name).write_bytes(jpeg(im))
        rows.append((f"{base}/{name}", captions))
    return rows


def write_tables(work: Path, base: str, pictures) -> None:
    """CC3M's and CC12M's TSVs and a LAION parquet, their images under work/web."""
    web, meta = work / "web", work / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    start = 0
    rows = {}
    for recipe, (n, heldout, fraction) in TABLES.items():
        rows[recipe] = web_rows(web, base, recipe, pictures[start:start + n], heldout, fraction)
        start += n
    missing = f"{base}/gone/0000.jpg"  # kept by every filter, lost at download (404)
    cc3m = [(caps[1], url) for url, caps in rows["cc3m"]] + [("an emoji that is no longer there", missing)]
    (meta / "Train_GCC-training.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in cc3m))
    cc12m = [(url, caps[1]) for url, caps in rows["cc12m"]] + [(missing, "an emoji that is no longer there")]
    (meta / "cc12m.tsv").write_text("".join(f"{u}\t{c}\n" for u, c in cc12m))
    laion = [(url, f"a cartoon of {caps[0]}", 512, 0.33) for url, caps in rows["laion-cartoon"]]
    first = rows["laion-cartoon"][-1][0]
    laion += [(first, f"a photo of {rows['laion-cartoon'][-1][1][0]}", 512, 0.33),  # no cartoon word: caption regex
              (first + "?small", "a cartoon of a tiny picture", 128, 0.33),  # WIDTH below 256
              (first + "?far", "a cartoon of something else entirely", 512, 0.1),  # similarity below 0.28
              (missing, "a cartoon that is no longer there", 512, 0.33)]
    folder = meta / "relaion-parquet"
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"URL": [r[0] for r in laion], "TEXT": [r[1] for r in laion],
                             "WIDTH": [r[2] for r in laion], "HEIGHT": [512] * len(laion),
                             "similarity": [r[3] for r in laion], "punsafe": [0.01] * len(laion),
                             "pwatermark": [0.1] * len(laion)}), folder / "part-00000.parquet")


def write_reed(root: Path, kind: str, pictures) -> None:
    """CUB-200 / Oxford-102 as Reed et al. lay them out: two classes, the second held out (testclasses.txt)."""
    classes = ("001.Black_footed_Albatross", "002.Laysan_Albatross") if kind == "cub200" else ("class_00001", "class_00002")
    for i, (captions, im) in enumerate(pictures):
        cls = classes[i * 4 // len(pictures) >= 3]  # a quarter of the images in the held-out class
        stem = f"{cls.split('.')[-1]}_{i:04d}" if kind == "cub200" else f"image_{i + 1:05d}"
        image = root / ("images" / Path(cls) if kind == "cub200" else Path("jpg")) / f"{stem}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(jpeg(im))
        text = root / "text_c10" / cls / f"{stem}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text("\n".join(f"this is {c}" for c in captions) + "\n")
    (root / "testclasses.txt").write_text(classes[1] + "\n")


def write_coco(root: Path, pictures) -> None:
    """MSCOCO 2014: a quarter of the images in val2014 (the test split), two captions each."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    split_at = len(pictures) * 3 // 4
    for split, part in (("train2014", pictures[:split_at]), ("val2014", pictures[split_at:])):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for captions, im in part:
            image_id = 100 + len(images) + (0 if split == "train2014" else 1000)
            name = f"COCO_{split}_{image_id:012d}.jpg"
            (root / split / name).write_bytes(jpeg(im))
            images.append({"id": image_id, "file_name": name, "width": im.width, "height": im.height})
            annotations += [{"id": image_id * 10 + j, "image_id": image_id, "caption": f"a picture of {c}"}
                            for j, c in enumerate(captions)]
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images,
                                                                                 "annotations": annotations}))


def write_clip_folder(folder: Path, seed: int = 0) -> Path:
    """A random CLIP text model as transformers saves one (config.json + model.safetensors), with a CLIPTokenizer
    on CLIP's own BPE vocabulary (open_clip's, the one the data pipeline tokenizes with)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from vqd.text import CONTEXT_LENGTH, VOCAB_SIZE, _tokenizer

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT_LENGTH, hidden_act="quick_gelu",
                            bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=1, **CLIP_TEXT)
    CLIPTextModel(config).save_pretrained(folder)
    bpe = _tokenizer(CONTEXT_LENGTH)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's -> OpenAI's
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    return folder


def make(work: Path, base: str) -> None:
    """Every file of the rehearsal's world (see the module docstring) under `work`, its web images at `base`."""
    need = sum(n for n, _, _ in TABLES.values()) + sum(FOLDERS.values())
    pictures = emoji_pictures(need)
    write_tables(work, base, pictures)
    start = sum(n for n, _, _ in TABLES.values())
    for kind, n in FOLDERS.items():
        part = pictures[start:start + n]
        start += n
        root = work / "datasets" / kind
        write_coco(root, part) if kind == "mscoco" else write_reed(root, kind, part)
    write_clip_folder(work / "clip-vit-tiny")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path, help="the rehearsal's folder")
    p.add_argument("--web", required=True, help="the address WORK/web is served at, e.g. http://127.0.0.1:8123")
    args = p.parse_args()
    make(args.work.resolve(), args.web.rstrip("/"))
    print(f"wrote the rehearsal's data sets and CLIP folder under {args.work}; its web is {args.web}")


if __name__ == "__main__":
    main()
