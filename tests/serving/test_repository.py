"""The repository scan: which folders are model versions."""

from __future__ import annotations

from serving.discovery import scan


def test_only_ascii_digit_folders_with_a_model_are_versions(tmp_path):
    model = tmp_path / "mnist"
    for name in ("1", "12", "²", "١", "v3", ".tmp-4", "5"):
        (model / name).mkdir(parents=True)
        if name != "5":  # 5 has no model.onnx yet
            (model / name / "model.onnx").write_bytes(b"")
    (model / "7").write_text("a file, not a folder")
    (tmp_path / ".hidden" / "1").mkdir(parents=True)
    (tmp_path / ".hidden" / "1" / "model.onnx").write_bytes(b"")
    assert scan(tmp_path) == {"mnist": {1: model / "1", 12: model / "12"}}
