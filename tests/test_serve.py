"""The prompt page (training/serve.py): its input checks on their own, then the page as a user meets it, served
by the program on 127.0.0.1 with an access token and driven in a real headless browser (Debian's Chromium
through chromedriver): a typed prompt gives the pictures the library draws for it, another prompt other
pictures; bad input gets a message and the server goes on; inpainting takes an upload and a painted region;
requests without the token are refused, and the token is in no log line."""

import io
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import REPO, launch, launcher_env
from PIL import Image
from test_sample_cli import model_folder
from token_data import PATTERNS, draw, write_token_dataset

from training.evaluation.grid import captioned_grid
from training.serving.access import is_loopback, read_token_file, resolve_token
from training.serving.page import EDITOR_PX, BadInput, Limits, check_prompts, check_settings, painted_mask, read_upload
from vqd.images import load_image
from vqd.pipeline import TextToImage, to_uint8

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG of side x side 1-bit pixels in ~100 KB: 112 MB once decoded (as 8-bit grey, 900 MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * ((side + 7) // 8 + 1) * side, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)) + \
        chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ the checks alone


def test_uploads_are_images_of_bounded_size_decoded_from_their_header_first(tmp_path):
    limits = Limits(max_upload_bytes=200_000, max_upload_pixels=64 * 64)
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(BadInput, match="declares more than 4,096 pixels"):
        read_upload(str(tmp_path / "bomb.png"), 16, limits)
    (tmp_path / "fake.png").write_text("not an image at all")
    with pytest.raises(BadInput, match="the upload is not an image"):
        read_upload(str(tmp_path / "fake.png"), 16, limits)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.tiff")  # an image, but not a kind the page takes
    with pytest.raises(BadInput, match="the upload is a TIFF file"):
        read_upload(str(tmp_path / "x.tiff"), 16, limits)
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + bytes(300_000))
    with pytest.raises(BadInput, match="the limit is 0 MiB"):
        read_upload(str(tmp_path / "big.png"), 16, limits)
    png = draw(PATTERNS["green border"], size=32)
    (tmp_path / "ok.png").write_bytes(png)
    assert torch.equal(read_upload(str(tmp_path / "ok.png"), 16, limits), load_image(png, 16))


def test_prompts_and_settings_are_checked_against_the_model(tmp_path):
    pipe = TextToImage.from_folder(model_folder(tmp_path / "text"))
    limits = Limits(max_count=4)
    assert check_prompts(pipe, "  red heart ", 3, limits) == ["red heart"] * 3
    for prompt, count, match in [("", 2, "type a prompt"), ("x", 0, "number of images must be a whole number from 1 to 4"),
                                 ("x", 5, "from 1 to 4, got 5"), ("x", 2.5, "got 2.5"), ("x", None, "got None"),
                                 ("x" * 1001, 1, "the limit is 1000")]:
        with pytest.raises(BadInput, match=match):
            check_prompts(pipe, prompt, count, limits)
    assert check_settings(pipe, 4, 0.5, 2, True).steps == 4
    for args, match in [((0, 0.5, 1, False), r"steps must be a whole number from 1 to 8, got 0"),
                        ((9, 0.5, 1, False), "from 1 to 8, got 9"), ((4, 0, 1, False), r"truncation r must be in \(0, 1\]"),
                        ((4, 0.5, -1, False), "guidance must be from 0 to 20"), ((float("nan"), 0.5, 1, False), "steps")]:
        with pytest.raises(BadInput, match=match):
            check_settings(pipe, *args)
    classes = TextToImage.from_folder(model_folder(tmp_path / "cls", condition="class", classes=("animal", "heart")))
    assert check_prompts(classes, "heart", 1, limits) == ["heart"]
    with pytest.raises(BadInput, match="pick a class from the list"):
        check_prompts(classes, "vehicle", 1, limits)
    none = TextToImage.from_folder(model_folder(tmp_path / "none", condition="none"))
    assert check_prompts(none, "ignored", 2, limits) == ["", ""]


def test_a_painted_canvas_marks_every_cell_it_touches():
    scale = EDITOR_PX // 16
    layer = np.zeros((16 * scale, 16 * scale, 4), dtype=np.uint8)
    layer[0, 0, 3] = 1  # one pixel of cell (0, 0)
    layer[40:45, 100, 3] = 255  # cell (2, 6)
    mask = painted_mask({"layers": [layer]}, 16)
    assert mask.sum() == 2 and mask[0, 0] and mask[2, 6]
    with pytest.raises(BadInput, match="paint over the region"):
        painted_mask({"layers": [np.zeros_like(layer)]}, 16)
    with pytest.raises(BadInput, match="not the canvas's"):
        painted_mask({"layers": [layer[:100]]}, 16)


def test_beyond_this_machine_the_page_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("VQD_SERVE_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert resolve_token("127.0.0.1", None) is None
    with pytest.raises(ValueError, match="--host 0.0.0.0 serves the page beyond this machine: it needs an access token"):
        resolve_token("0.0.0.0", None)
    token = resolve_token("0.0.0.0", str(tmp_path / "cfg" / "token"))  # created, owner-only, when missing
    assert len(token) >= 32 and stat.S_IMODE((tmp_path / "cfg" / "token").stat().st_mode) == 0o600
    assert read_token_file(tmp_path / "cfg" / "token") == token  # and read back as it is
    (tmp_path / "open").write_text("a-long-enough-token-here\n")
    (tmp_path / "open").chmod(0o644)
    with pytest.raises(ValueError, match="can be read by others"):
        read_token_file(tmp_path / "open")
    monkeypatch.setenv("VQD_SERVE_TOKEN", "short")
    with pytest.raises(ValueError, match="at least 16"):
        resolve_token("0.0.0.0", None)
    out = subprocess.run([sys.executable, "training/serve.py", "--model", str(tmp_path / "nothing"), "--host", "0.0.0.0"],
                         cwd=REPO, env={k: v for k, v in launcher_env().items() if k != "VQD_SERVE_TOKEN"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --host 0.0.0.0 serves the page beyond")
    assert len(out.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ the page, served


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A micro model that has learnt the toy captions' patterns (DeepSpeed, 2 ranks); its export carries the
    emoji config's sampling settings with T = 10."""
    root = tmp_path_factory.mktemp("page")
    data = write_token_dataset(root / "data", train=200, test=40, per_shard=25)
    launch("training/train.py", [
        "--config", "configs/emoji_base.yaml", f"--data.path={data}", f"--train.run_dir={root / 'run'}",
        f"--tracking.uri=sqlite:///{root / 'mlflow.db'}", "--tracking.experiment=test-serve", "--model.size=micro",
        "--text.pretrained=null", "--train.micro_batch_size=16", "--train.precision=fp32", "--train.num_workers=1",
        "--train.steps=200", "--train.save_every=200", "--train.image_every=0", "--train.eval_every=0",
        "--optim.lr=3e-3", "--optim.warmup_steps=5", "--train.ema_decay=0.9", "--diffusion.num_timesteps=10",
        "--sample.steps=10"])
    return root / "run" / "export"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, token: str | None = None, method: str = "GET", headers: dict | None = None,
            data: bytes | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body), redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """training/serve.py as a user starts it (127.0.0.1, the token from the environment); (url, token, log)."""
    token = "test-token-" + os.urandom(12).hex()
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = {**launcher_env(), "VQD_SERVE_TOKEN": token, "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "training/serve.py", "--model", str(trained), "--port", str(port),
                                 "--max-count", "16"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to ~5 minutes on a busy machine for imports, the model and the server
            if proc.poll() is not None:
                pytest.fail(f"serve.py exited {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if request(url + "/", token)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield url, token, log
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # a clean stop on SIGTERM (uvicorn exits by the signal it stopped for)
    assert proc.returncode in (0, -15) and "Traceback" not in log.read_text(errors="replace")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", "--window-size=1200,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    downloads = tmp_path_factory.mktemp("downloads")
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 300):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: condition(d))


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def type_into(driver, selector: str, text: str) -> None:
    """Replace a field's text as a user does (select all, type), so that the page sees the change."""
    from selenium.webdriver.common.keys import Keys

    (field,) = css(driver, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def message(driver, text: str) -> None:
    """Wait for the page's message holding `text`, then close every message."""
    wait(driver, lambda d: any(text in m.text for m in css(d, "[data-testid=toast-text]")), 120)
    for close in css(driver, "[data-testid=toast-close]"):
        close.click()
    wait(driver, lambda d: not css(d, "[data-testid=toast-text]"), 60)


def picture(driver, selector: str, token: str, previous: str | None = None) -> tuple[str, np.ndarray]:
    """Wait for the image in `selector` (another than `previous`) and fetch it as the page shows it."""
    def src(d):
        found = [i.get_attribute("src") for i in css(d, f"{selector} img")]
        return found[0] if found and found[0] and found[0] != previous else None

    url = wait(driver, src)
    status, _, body = request(url, token)
    assert status == 200, url
    return url, np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def cells(grid: np.ndarray, n: int, cell: int = 128, pad: int = 4) -> list[np.ndarray]:
    """The first `n` pictures of a captioned grid's first row (training/evaluation/grid.py's layout)."""
    return [grid[pad:pad + cell, pad + i * (cell + pad):pad + i * (cell + pad) + cell] for i in range(n)]


def expected_grid(pipe: TextToImage, prompt: str, count: int, seed: int = 0) -> np.ndarray:
    """What the library draws for the request, laid out as the page lays it out."""
    images = pipe.generate([prompt] * count, generator=torch.Generator().manual_seed(seed))
    return np.asarray(captioned_grid(to_uint8(images).numpy(), [prompt] * count, ncols=count).convert("RGB"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_page_draws_what_is_typed_and_answers_bad_input(server, browser, trained):
    url, token, _ = server
    pipe = TextToImage.from_folder(trained)
    browser.get(f"{url}/?token={token}")  # a first visit brings the token; the page drops it from the address
    wait(browser, lambda d: css(d, "#prompt textarea"))
    assert "token" not in browser.current_url
    # the sampling settings start at the model folder's
    values = {name: css(browser, f"#{name} input")[0].get_attribute("value") for name in ("steps", "truncation", "guidance")}
    assert values == {"steps": "10", "truncation": "0.5", "guidance": "2"} and css(browser, "#purity input")[0].is_selected()

    type_into(browser, "#prompt textarea", "red stripes")
    type_into(browser, "#count input", "2")
    css(browser, "#draw")[0].click()
    first_url, first = picture(browser, "#grid", token)
    assert np.array_equal(first, expected_grid(pipe, "red stripes", 2))
    wait(browser, lambda d: "2 pictures, seed 0; steps 10 of 10, truncation r 0.5, guidance 2, purity on"
         in css(d, "#said")[0].text)
    css(browser, "#download")[0].click()  # the grid's PNG, downloaded as a user does
    wait(browser, lambda d: [p for p in d.downloads.iterdir() if p.suffix == ".png"])
    (saved,) = [p for p in browser.downloads.iterdir() if p.suffix == ".png"]
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), first)

    type_into(browser, "#prompt textarea", "blue checkerboard")
    css(browser, "#draw")[0].click()
    second_url, second = picture(browser, "#grid", token, previous=first_url)
    assert np.array_equal(second, expected_grid(pipe, "blue checkerboard", 2))
    assert not np.array_equal(cells(first, 2), cells(second, 2))  # the pictures, not only their captions

    for field, value, text in [("#prompt textarea", "", "type a prompt"),
                               ("#count input", "0", "the number of images must be a whole number from 1 to 16, got 0"),
                               ("#steps input", "11", "steps must be a whole number from 1 to 10, got 11")]:
        before = css(browser, field)[0].get_attribute("value")
        type_into(browser, field, value)
        css(browser, "#draw")[0].click()
        message(browser, text)
        type_into(browser, field, before)
    type_into(browser, "#count input", "3")  # and the server goes on serving
    css(browser, "#draw")[0].click()
    _, again = picture(browser, "#grid", token, previous=second_url)
    assert np.array_equal(again, expected_grid(pipe, "blue checkerboard", 3))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_inpainting_takes_an_image_and_a_painted_region_and_refuses_other_uploads(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, token, log = server
    if not css(browser, "#prompt textarea"):
        browser.get(f"{url}/?token={token}")
        wait(browser, lambda d: css(d, "#prompt textarea"))
    type_into(browser, "#prompt textarea", "green border")
    type_into(browser, "#count input", "3")
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Inpaint')]").click()

    def upload(path: Path) -> None:
        if not css(browser, "#upload input[type=file]"):  # a file is shown: clear it first
            css(browser, "#upload button[aria-label=Clear]")[0].click()
        wait(browser, lambda d: css(d, "#upload input[type=file]"))
        css(browser, "#upload input[type=file]")[0].send_keys(str(path))

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.png").write_text("not an image at all")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    for name, text in [("notes.txt", "notes.txt"), ("fake.png", "the upload is not an image"),
                       ("bomb.png", "declares more than 16,777,216 pixels")]:
        upload(tmp_path / name)
        message(browser, text)
    css(browser, "#inpaint")[0].click()  # nothing on the canvas yet
    message(browser, "upload an image first")

    image = draw(PATTERNS["green border"])  # 16 px, the model's size
    (tmp_path / "in.png").write_bytes(image)
    upload(tmp_path / "in.png")
    wait(browser, lambda d: "The image at the model's 16 px" in css(d, "#upload_said")[0].text)
    canvas = css(browser, "#editor canvas")[0]
    css(browser, "#inpaint")[0].click()  # nothing painted yet
    message(browser, "paint over the region to regenerate")
    ActionChains(browser).move_to_element_with_offset(canvas, -40, -40).click_and_hold().move_by_offset(25, 25) \
        .release().perform()
    css(browser, "#inpaint")[0].click()
    _, grid = picture(browser, "#filled", token)
    shown = cells(grid, 5)
    given = np.asarray(Image.open(io.BytesIO(image)).convert("RGB").resize((128, 128), Image.Resampling.NEAREST))
    assert np.array_equal(shown[0], given)  # the input as uploaded
    black = (shown[1] == 0).all(axis=2)  # what was kept: the painted token cells black, the rest as given
    assert 0 < black.mean() < 1 and np.array_equal(shown[1][~black], given[~black])
    assert grid.shape[1] == 5 * (128 + 4) + 4  # input, kept, and the 3 pictures asked for

    # no log line holds the token, though every request carried it
    assert token not in log.read_text(errors="replace")


@pytest.mark.slow
def test_requests_without_the_token_are_refused(server):
    url, token, log = server
    assert request(url + "/")[0] == 401
    assert request(url + "/", "not-the-token")[0] == 401
    assert request(url + "/?token=not-the-token")[0] == 401
    assert request(url + "/gradio_api/upload", method="POST", data=b"x")[0] == 401
    assert request(url + "/gradio_api/queue/join", method="POST", data=b"{}",
                   headers={"Content-Type": "application/json"})[0] == 401
    assert request(url + "/gradio_api/info")[0] == 401
    assert request(url + "/gradio_api/info", token)[0] == 200
    status, headers, _ = request(url + "/?token=" + token + "&x=1")  # the browser's way in: a cookie, a clean address
    assert status == 303 and headers["location"] == "/?x=1"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert request(url + "/gradio_api/info", headers={"Cookie": cookie.split(";")[0]})[0] == 200
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:  # a body announced over the limit
        s.sendall(f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Length: {9 << 20}\r\n\r\n".encode())
        assert s.recv(64).startswith(b"HTTP/1.1 413")  # refused before any of it is read: 8 MiB uploads at most
    assert token not in log.read_text(errors="replace")
