"""python -m mmsi_jax.models.fetch against a local HTTP server on the loopback address (nothing here
reaches outside): a verified download, a refused one, and the missing-weights error naming the command."""

import functools
import hashlib
import http.server
import os
import threading

import pytest

from mmsi_jax import models
from mmsi_jax.models import fetch, torch_weights


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """(directory served, its base URL) of an HTTP server on 127.0.0.1."""
  root = tmp_path_factory.mktemp("served")
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
  handler.log_message = lambda *args: None
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()


def test_a_download_is_kept_only_when_its_checksum_is_the_published_one(server, tmp_path, capsys):
  root, url = server
  content = os.urandom(3 * fetch.CHUNK + 17)
  (root / "weights.pth").write_bytes(content)
  target = tmp_path / "out" / "weights.pth"
  fetch.download(f"{url}/weights.pth", str(target), hashlib.sha256(content).hexdigest(), len(content))
  assert target.read_bytes() == content
  assert "weights.pth: 100%" in capsys.readouterr().err  # The progress bar.

  refused = tmp_path / "refused.pth"
  with pytest.raises(fetch.ChecksumError, match="SHA-256 .* published"):
    fetch.download(f"{url}/weights.pth", str(refused), "0" * 64, progress=False)
  with pytest.raises(fetch.ChecksumError, match=f"{len(content)} bytes received, 5 published"):
    fetch.download(f"{url}/weights.pth", str(refused), hashlib.sha256(content).hexdigest(), 5,
                   progress=False)
  assert os.listdir(tmp_path) == ["out"]  # Nor the partial file.


def test_the_command_refuses_a_file_that_is_not_the_published_one(server, tmp_path, capsys):
  root, url = server
  (root / "resnet18-f37072fd.pth").write_bytes(b"not the ImageNet weights")
  assert fetch.main(["resnet18", f"--to={tmp_path}", f"--mirror={url}"]) == 1
  assert "is not the published file" in capsys.readouterr().err
  assert not os.listdir(tmp_path)
  (tmp_path / "resnet18-f37072fd.pth").write_bytes(b"a stale copy")
  assert fetch.main(["resnet18-f37072fd.pth", f"--to={tmp_path}", f"--mirror={url}"]) == 1
  assert "exists but is not the published file" in capsys.readouterr().err
  assert fetch.main(["resnet34", f"--to={tmp_path}"]) == 1
  assert "known: bn_inception" in capsys.readouterr().err
  assert fetch.main(["--list"]) == 0
  assert all(p.sha256 in capsys.readouterr().out for p in [fetch.PUBLISHED["resnet50"]])


def test_missing_weights_name_the_command_that_fetches_them(tmp_path):
  path = str(tmp_path / "resnet50-0676ba61.pth")
  with pytest.raises(torch_weights.WeightsError,
                     match=f"`python -m mmsi_jax.models.fetch resnet50 --to {tmp_path}`"):
    models.get("resnet50", pretrained=path)
  with pytest.raises(torch_weights.WeightsError, match="mmsi_jax.models.fetch bn_inception"):
    models.get("bn_inception", pretrained=str(tmp_path / "bn_inception-52deb4733.pth"))
  with pytest.raises(torch_weights.WeightsError, match="no such file. Put torchvision's"):
    models.get("resnet18", pretrained=str(tmp_path / "my_resnet18.npz"))
