"""Calibration data: loading (.npy, .npz, images), preprocessing math, errors, batches, cache keys."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.calibration import (CalibrationReader, InputInfo, NO_DATA_FIX, as_input_info, calibration_batch_size,
                               calibration_batches, inputs_from_onnx, load_calibration_data, preprocess_image)
from tasks.errors import ModelError
from tasks.spec import Preprocess, parse_spec
from tests.models import small_cnn, two_input_model

IMAGES = [InputInfo("images", "float32", ("N", 3, 32, 32))]
TWO = inputs_from_onnx(two_input_model())


def spec(**calibration):
    return parse_spec({"calibration": calibration} if calibration else {})


def rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ---- model inputs -------------------------------------------------------------------------------
def test_input_descriptions_from_onnx_and_from_the_validators_dicts():
    assert inputs_from_onnx(small_cnn()) == [InputInfo("images", "float32", ("N", 3, 32, 32))]
    assert [i.dtype for i in TWO] == ["float32", "int64"]
    # the dict shape tasks/precision_inputs.py passes (ONNX elem_type beside the numpy name)
    assert as_input_info({"name": "ids", "elem_type": 7, "shape": ["N", 4]}) == InputInfo("ids", "int64", ("N", 4))
    assert as_input_info({"name": "x", "dtype": "tensor(float)", "shape": [1]}).dtype == "float32"


# ---- .npy / .npz --------------------------------------------------------------------------------
def test_npy_files_named_after_the_input_or_not_feed_the_only_input(tmp_path):
    np.save(tmp_path / "images.npy", rand(5, 3, 32, 32).astype(np.float64))  # float64 is narrowed
    np.save(tmp_path / "one_sample.npy", rand(3, 32, 32, seed=1))             # a single sample, no sample dim
    data = load_calibration_data(tmp_path, spec(), IMAGES)
    assert data.samples == 6 and not data.synthetic and data.note is None
    assert data.arrays["images"].dtype == np.float32
    np.testing.assert_allclose(data.arrays["images"][:5], rand(5, 3, 32, 32), rtol=1e-6)
    np.testing.assert_allclose(data.arrays["images"][5], rand(3, 32, 32, seed=1))
    assert data.sources == ["images.npy", "one_sample.npy"]


def test_npz_keyed_by_input_name_feeds_every_input_and_casts_integer_widths(tmp_path):
    np.savez(tmp_path / "a.npz", features=rand(4, 16), ids=np.arange(16, dtype=np.int32).reshape(4, 4))
    np.savez(tmp_path / "b.npz", features=rand(2, 16, seed=3), ids=np.zeros((2, 4), np.int64))
    data = load_calibration_data(tmp_path, spec(), TWO)
    assert data.samples == 6
    assert data.arrays["ids"].dtype == np.int64 and data.arrays["ids"][1, 0] == 4
    assert data.arrays["features"].shape == (6, 16)


def test_npy_for_a_multi_input_model_must_be_named_after_its_input(tmp_path):
    np.save(tmp_path / "features.npy", rand(3, 16))
    with pytest.raises(ModelError, match=r"no samples for input\(s\) ids"):
        load_calibration_data(tmp_path, spec(), TWO)
    np.save(tmp_path / "ids.npy", np.ones((3, 4), np.int64))
    assert load_calibration_data(tmp_path, spec(), TWO).samples == 3
    np.save(tmp_path / "mystery.npy", rand(3, 16))
    with pytest.raises(ModelError, match=r"mystery.npy does not say which input.*features, ids"):
        load_calibration_data(tmp_path, spec(), TWO)


def test_calibration_input_routes_unnamed_npy_files(tmp_path):
    np.save(tmp_path / "batch0.npy", rand(2, 16))
    np.savez(tmp_path / "rest.npz", features=rand(2, 16), ids=np.ones((2, 4), np.int64))
    with pytest.raises(ModelError, match="batch0.npy does not say which input"):
        load_calibration_data(tmp_path, spec(), TWO)
    with pytest.raises(ModelError, match="different sample counts per input"):
        load_calibration_data(tmp_path, spec(input="features"), TWO)  # features 4, ids 2
    with pytest.raises(ModelError, match="calibration.input names 'nope'"):
        load_calibration_data(tmp_path, spec(input="nope"), TWO)


def test_npz_with_unknown_or_missing_inputs_names_them(tmp_path):
    np.savez(tmp_path / "a.npz", features=rand(2, 16), idz=np.ones((2, 4), np.int64))
    with pytest.raises(ModelError, match=r"arrays idz, which the model has no inputs called") as err:
        load_calibration_data(tmp_path, spec(), TWO)
    assert "features, ids" in err.value.fix
    (tmp_path / "a.npz").unlink()
    np.savez(tmp_path / "b.npz", features=rand(2, 16))
    with pytest.raises(ModelError, match=r"b.npz lacks arrays for input\(s\) ids"):
        load_calibration_data(tmp_path, spec(), TWO)


def test_wrong_shapes_and_dtypes_are_model_errors_naming_input_and_shapes(tmp_path):
    np.save(tmp_path / "images.npy", rand(2, 3, 28, 28))
    with pytest.raises(ModelError, match=r"'images' samples of shape \[3, 28, 28\], the model wants \[3, 32, 32\]"):
        load_calibration_data(tmp_path, spec(), IMAGES)
    np.save(tmp_path / "images.npy", rand(2, 2, 3, 32, 32))
    with pytest.raises(ModelError, match=r"shape \[2, 2, 3, 32, 32\]"):
        load_calibration_data(tmp_path, spec(), IMAGES)
    np.save(tmp_path / "images.npy", np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ModelError, match="uint8 data for input 'images', which is float32"):
        load_calibration_data(tmp_path, spec(), IMAGES)
    (tmp_path / "images.npy").unlink()
    np.savez(tmp_path / "x.npz", features=rand(2, 16), ids=rand(2, 4))
    with pytest.raises(ModelError, match="float32 data for input 'ids', which is int64"):
        load_calibration_data(tmp_path, spec(), TWO)


def test_dynamic_dims_accept_any_size_but_one_size_per_input(tmp_path):
    dyn = [InputInfo("tokens", "float32", ("N", "T", 8))]
    np.save(tmp_path / "a.npy", rand(2, 5, 8))
    assert load_calibration_data(tmp_path, spec(), dyn).arrays["tokens"].shape == (2, 5, 8)
    np.save(tmp_path / "b.npy", rand(2, 6, 8))
    with pytest.raises(ModelError, match=r"different shapes: \[\[5, 8\], \[6, 8\]\]"):
        load_calibration_data(tmp_path, spec(), dyn)


def test_max_samples_caps_the_data_and_later_files_are_not_read(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"images-{i}.npy", rand(4, 3, 32, 32, seed=i))
    data = load_calibration_data(tmp_path, spec(max_samples=6), IMAGES)
    assert data.samples == 6 and data.sources == ["images-0.npy", "images-1.npy"]
    (tmp_path / "images-9.npy").write_bytes(b"not an array at all")  # past the cap: never opened
    again = load_calibration_data(tmp_path, spec(max_samples=6), IMAGES)
    assert again.sha256 == data.sha256


def test_unreadable_files_are_model_errors(tmp_path):
    (tmp_path / "images.npy").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a readable .npy"):
        load_calibration_data(tmp_path, spec(), IMAGES)
    (tmp_path / "images.npy").unlink()
    (tmp_path / "cat.png").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cat.png cannot be read as an image"):
        load_calibration_data(tmp_path, spec(), IMAGES)


# ---- no data / synthetic ----------------------------------------------------------------------------
@pytest.mark.parametrize("folder", [None, "empty", "missing"])
def test_no_data_without_synthetic_is_a_model_error_saying_how_to_fix_it(tmp_path, folder):
    path = None if folder is None else tmp_path / folder
    if folder == "empty":
        path.mkdir()
        (path / "README.txt").write_text("not data")
    with pytest.raises(ModelError, match="INT8 needs calibration data") as err:
        load_calibration_data(path, spec(), IMAGES)
    assert err.value.fix == NO_DATA_FIX
    assert "calibration.synthetic: true" in str(err.value)


def test_int8_without_data_is_refused_before_any_limited_child_starts(tmp_path, monkeypatch):
    """The default chain starts with int8, so most packages reach this: no 2 s process start to find nothing."""
    from tasks import precision_inputs
    from tasks.gpu import compat
    from tasks.package import LocalPackage
    from tests import models

    def no_child(*args, **kwargs):
        raise AssertionError("a limited child process was started")

    monkeypatch.setattr(precision_inputs, "run_limited", no_child)
    model = models.save(small_cnn(), tmp_path / "pkg" / "model.onnx")
    package = LocalPackage("cnn", tmp_path / "pkg", model, "ab" * 32, "etag", 1, f"file://{model}")
    with pytest.raises(ModelError, match="INT8 needs calibration data") as err:
        precision_inputs.prepare(None, tensorrt="8.6.1", caps=compat.caps_for_version("8.6.1"), target_key=None,
                                 spec=spec(), package=package, precision="int8", profiles=[], workdir=tmp_path)
    assert err.value.fix == NO_DATA_FIX


def test_synthetic_data_has_the_profile_opt_shape_is_seeded_and_flagged():
    profiles = [{"images": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}}]
    a = load_calibration_data(None, spec(synthetic=True), IMAGES, profiles=profiles)
    b = load_calibration_data(None, spec(synthetic=True), IMAGES, profiles=profiles)
    assert a.synthetic and "not representative" in a.note
    assert a.arrays["images"].shape == (16, 3, 32, 32)  # four opt batches
    assert a.sha256 == b.sha256 and np.array_equal(a.arrays["images"], b.arrays["images"])
    two = load_calibration_data(None, spec(synthetic=True, max_samples=10), TWO)  # default opt batch 8
    assert two.samples == 10 and two.arrays["ids"].dtype == np.int64 and set(np.unique(two.arrays["ids"])) <= {0, 1}
    with pytest.raises(ModelError, match=r"dim 1 is dynamic \('T'\)") as err:
        load_calibration_data(None, spec(synthetic=True), [InputInfo("tokens", "float32", ("N", "T"))])
    assert "profile" in err.value.fix


def test_real_data_wins_over_synthetic_when_both_are_there(tmp_path):
    np.save(tmp_path / "images.npy", rand(3, 3, 32, 32))
    data = load_calibration_data(tmp_path, spec(synthetic=True), IMAGES)
    assert not data.synthetic and data.samples == 3


# ---- images ---------------------------------------------------------------------------------------
def gradient_image(h=8, w=12) -> Image.Image:
    """R = 10*x, G = 10*y, B = 200: every pixel says where it came from."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 10 * np.arange(w)[None, :]
    a[..., 1] = 10 * np.arange(h)[:, None]
    a[..., 2] = 200
    return Image.fromarray(a)


def test_centre_crop_takes_the_middle_pixels_exactly():
    x = preprocess_image(gradient_image(), Preprocess(crop=[4, 6], scale=1.0))
    assert x.shape == (3, 4, 6)
    np.testing.assert_array_equal(x[0, 0], 10 * np.arange(3, 9))   # left = (12 - 6) / 2 = 3
    np.testing.assert_array_equal(x[1, :, 0], 10 * np.arange(2, 6))  # top = (8 - 4) / 2 = 2


def test_resize_shorter_side_keeps_aspect_and_exact_size_resizes_exactly():
    img = Image.new("RGB", (12, 8), (30, 60, 90))
    x = preprocess_image(img, Preprocess(resize=4, scale=1.0))
    assert x.shape == (3, 4, 6)
    np.testing.assert_allclose(x[:, 0, 0], [30, 60, 90], atol=1)  # a flat image stays flat
    assert preprocess_image(img, Preprocess(resize=[5, 7])).shape == (3, 5, 7)
    assert preprocess_image(img, Preprocess(resize=10, crop=8)).shape == (3, 8, 8)
    with pytest.raises(ModelError, match="larger than the image"):
        preprocess_image(img, Preprocess(crop=9))


def test_scale_mean_std_channel_order_layout_and_dtype():
    img = Image.new("RGB", (4, 2), (255, 0, 51))
    pp = Preprocess(mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 1.0])
    np.testing.assert_allclose(preprocess_image(img, pp)[:, 0, 0], [1.0, -2.0, -0.3], rtol=1e-6)
    bgr = Preprocess(channel_order="bgr", mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 1.0])  # mean/std in BGR order
    np.testing.assert_allclose(preprocess_image(img, bgr)[:, 0, 0], [-0.6, -2.0, 0.5], rtol=1e-5)
    nhwc = preprocess_image(img, Preprocess(layout="nhwc", dtype="float16"))
    assert nhwc.shape == (2, 4, 3) and nhwc.dtype == np.float16
    np.testing.assert_allclose(nhwc[0, 0], [1.0, 0.0, 0.2], atol=1e-3)
    u8 = preprocess_image(img, Preprocess(dtype="uint8"))  # bytes wanted: the default 1/255 is not applied
    assert u8.dtype == np.uint8 and list(u8[:, 0, 0]) == [255, 0, 51]
    with pytest.raises(ModelError, match="mean has 2 values for 3-channel"):
        preprocess_image(img, Preprocess(mean=[0.1, 0.2]))


def test_images_in_the_package_become_the_image_inputs_samples(tmp_path):
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 48), colour).save(tmp_path / f"img{i}.png")
    Image.new("RGB", (40, 48), (255, 255, 255)).save(tmp_path / "img3.jpg", quality=95)
    data = load_calibration_data(tmp_path, spec(preprocess={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}), IMAGES)
    x = data.arrays["images"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32  # no resize/crop: fitted to the model's 32x32
    np.testing.assert_allclose(x[0, :, 5, 5], [1, -1, -1], atol=1e-6)
    np.testing.assert_allclose(x[2, :, 5, 5], [-1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(x[3, :, 5, 5], [1, 1, 1], atol=0.02)  # JPEG: close, not exact
    wrong = spec(preprocess={"crop": 24})
    with pytest.raises(ModelError, match=r"samples of shape \[3, 24, 24\], the model wants \[3, 32, 32\]"):
        load_calibration_data(tmp_path, wrong, IMAGES)


def test_images_for_a_uint8_input_need_the_uint8_dtype(tmp_path):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    u8 = [InputInfo("images", "uint8", ("N", 8, 8, 3))]
    with pytest.raises(ModelError, match="float32 data for input 'images', which is uint8") as err:
        load_calibration_data(tmp_path, spec(preprocess={"layout": "nhwc"}), u8)
    assert err.value.fix == "Set calibration.preprocess.dtype: uint8."
    data = load_calibration_data(tmp_path, spec(preprocess={"layout": "nhwc", "dtype": "uint8"}), u8)
    assert data.arrays["images"].dtype == np.uint8 and list(data.arrays["images"][0, 0, 0]) == [10, 20, 30]


def test_images_for_dynamic_height_width_use_the_profile_and_need_a_named_input_on_multi_input_models(tmp_path):
    Image.new("RGB", (20, 10), (10, 20, 30)).save(tmp_path / "a.png")
    dyn = [InputInfo("images", "float32", ("N", 3, "H", "W"))]
    profiles = [{"images": {"min": [1, 3, 8, 8], "opt": [2, 3, 12, 16], "max": [4, 3, 32, 32]}}]
    assert load_calibration_data(tmp_path, spec(), dyn, profiles=profiles).arrays["images"].shape == (1, 3, 12, 16)
    with pytest.raises(ModelError, match="several inputs"):
        load_calibration_data(tmp_path, spec(), TWO)
    with pytest.raises(ModelError, match="rank-4 image input"):
        load_calibration_data(tmp_path, spec(input="features"), TWO)


# ---- cache keys -----------------------------------------------------------------------------------
def test_sha_depends_on_file_contents_and_recipe_not_on_where_the_package_lies(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    np.save(a / "images.npy", rand(4, 3, 32, 32))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(a / "x.png")
    base = load_calibration_data(a, spec(), IMAGES).sha256
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert load_calibration_data(b, spec(), IMAGES).sha256 == base          # same data, same key
    assert load_calibration_data(a, spec(preprocess={"mean": [0.1, 0.1, 0.1]}), IMAGES).sha256 != base  # recipe
    assert load_calibration_data(a, spec(max_samples=3), IMAGES).sha256 != base
    np.save(b / "images.npy", rand(4, 3, 32, 32, seed=9))
    assert load_calibration_data(b, spec(), IMAGES).sha256 != base          # changed contents


def test_preprocess_only_counts_when_images_are_used(tmp_path):
    np.save(tmp_path / "images.npy", rand(2, 3, 32, 32))
    one = load_calibration_data(tmp_path, spec(), IMAGES).sha256
    assert load_calibration_data(tmp_path, spec(preprocess={"resize": 40}), IMAGES).sha256 == one


# ---- batches --------------------------------------------------------------------------------------
def test_batches_hold_exactly_batch_size_samples_keyed_by_input_and_wrap_round(tmp_path):
    np.savez(tmp_path / "d.npz", features=rand(10, 16), ids=np.arange(40, dtype=np.int64).reshape(10, 4))
    data = load_calibration_data(tmp_path, spec(), TWO)
    paths = calibration_batches(data, 4, tmp_path / "batches")
    assert [p.name for p in paths] == ["batch-00000.npz", "batch-00001.npz", "batch-00002.npz"]
    for p in paths:
        with np.load(p) as z:
            assert sorted(z.files) == ["features", "ids"]
            assert z["features"].shape == (4, 16) and z["ids"].shape == (4, 4) and z["ids"].dtype == np.int64
    with np.load(paths[-1]) as z:
        np.testing.assert_array_equal(z["ids"][:, 0], [32, 36, 0, 4])  # samples 8, 9, then 0, 1 again
    # fewer samples than a batch still make one full batch; stale batches of an earlier run are removed
    small = calibration_batches(data, 16, tmp_path / "batches")
    assert len(small) == 1 and not (tmp_path / "batches" / "batch-00001.npz").exists()


def test_batches_must_have_the_calibration_profiles_opt_shape(tmp_path):
    np.save(tmp_path / "images.npy", rand(10, 3, 32, 32))
    data = load_calibration_data(tmp_path, spec(), IMAGES)
    profiles = [{"images": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}]
    assert len(calibration_batches(data, 8, tmp_path / "b", profiles=profiles)) == 2
    with pytest.raises(ModelError, match=r"would be \[4, 3, 32, 32\].*opt shape is \[8, 3, 32, 32\]") as err:
        calibration_batches(data, 4, tmp_path / "b", profiles=profiles)
    assert "calibration.batch_size: 8" in err.value.fix


def test_calibration_batch_size_follows_the_profile_unless_the_spec_contradicts_it():
    profiles = [{"images": {"min": [1, 3, 32, 32], "opt": [16, 3, 32, 32], "max": [32, 3, 32, 32]}}]
    assert calibration_batch_size(spec(), profiles) == 16
    assert calibration_batch_size(spec(batch_size=16), profiles) == 16
    assert calibration_batch_size(spec(batch_size=4)) == 4
    with pytest.raises(ModelError, match="calibration.batch_size is 8, but the calibration profile's opt batch is 16"):
        calibration_batch_size(spec(batch_size=8), profiles)


def test_reader_for_onnxruntime_batches_ranges_and_pads(tmp_path):
    np.save(tmp_path / "images.npy", rand(10, 3, 32, 32))
    data = load_calibration_data(tmp_path, spec(), IMAGES)
    reader = CalibrationReader(data, batch_size=4)
    sizes = [b["images"].shape[0] for b in iter(reader.get_next, None)]
    assert sizes == [4, 4, 2] and len(reader) == 3
    reader.set_range(1, 3)
    assert [b["images"].shape[0] for b in iter(reader.get_next, None)] == [4, 2]
    padded = CalibrationReader(data, batch_size=4, pad=True)
    assert [b["images"].shape[0] for b in iter(padded.get_next, None)] == [4, 4, 4]
    reader.rewind()
    assert reader.get_next() is not None
