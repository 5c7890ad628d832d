"""Write notebooks/tutorial.ipynb from the cells below (run after editing them)."""

from pathlib import Path

import nbformat as nbf

MD, CODE = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    MD("""# Fine-tuning Cellpose-SAM with cellpose-finetuning

This tutorial follows the whole workflow against the service, exactly as a remote client
would use it: start a local service, upload an annotated dataset, train while watching the
loss and F1, compare the starting and the fine-tuned model, look at instance metrics, export
a BioImage.IO model, download it, and find it again by its dataset.

It runs top to bottom with the *tiny* network (seconds on a CPU) so that it can be tested on
every change. With a GPU and real data, use `model="cpsam"` and cellpose's recommended
settings (`learning_rate=1e-5, weight_decay=0.1, n_epochs=100`)."""),
    MD(
        "## 1. Start a local service\n\nNormally you run `make serve` (or `cellpose-finetuning serve`) once in a terminal and skip this cell. Here the notebook starts its own embedded stack (SeaweedFS + Hypha) in a temporary folder on free ports."
    ),
    CODE("""import asyncio, os, random, tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import tifffile
import torch
from IPython.display import display

from cellpose_finetuning.deploy.serve import ServeOptions, read_connection_file, serve
from cellpose_finetuning.deploy.stack import StackConfig, port_is_free
from cellpose_finetuning.engine.models import PRESETS, build_network, save_network

REPO = Path.cwd() if (Path.cwd() / "tests").is_dir() else Path.cwd().parent
DEV = REPO / "tests" / "assets" / "dev"            # small real images with ground truth
OUT = Path(os.environ.get("TUTORIAL_OUT", REPO / "docs" / "tutorial"))
OUT.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp(prefix="cpft-tutorial-"))

def free_port():
    while True:  # below Linux's ephemeral range; SeaweedFS also uses port + 10000
        p = random.randint(11000, 22000)
        if port_is_free(p) and port_is_free(p + 10000):
            return p

ports = [free_port() for _ in range(5)]
config = StackConfig(data_dir=work, hypha_port=ports[0], s3_port=ports[1], weed_master_port=ports[2],
                     weed_volume_port=ports[3], weed_filer_port=ports[4])
# Offer an untrained tiny network as the model "tiny" (files in <data-dir>/models/ are offered by name).
torch.manual_seed(0)
save_network(build_network(PRESETS["tiny"]), PRESETS["tiny"], work / "models" / "tiny.pth")

ready, stop = asyncio.Event(), asyncio.Event()
service_task = asyncio.create_task(serve(ServeOptions(data_dir=work, stack=config, user="tutorial"), ready, stop))
await ready.wait()
conn = read_connection_file(work)"""),
    MD("## 2. Connect, as the original service's clients do"),
    CODE("""from hypha_rpc import connect_to_server

server = await connect_to_server({"server_url": conn["server_url"], "token": conn["token"]})
cellpose_service = await server.get_service("bioimage-io/cellpose-finetuning")
print(await cellpose_service.list_pretrained_models())"""),
    MD(
        "## 3. Upload an annotated dataset\n\n`upload_folder` sends a local folder (images and masks) as a dataset artifact, with concurrent uploads through presigned URLs. The dev data has `images/train/`, `annotations/train/` (identical file names) and a test split."
    ),
    CODE("""from cellpose_finetuning.client import upload_folder

dataset = await upload_folder(server, DEV, alias="tutorial-data")
print(dataset)"""),
    MD("## 4. Train, watching the loss and the validation F1 live"),
    CODE("""from tqdm.auto import tqdm

status = await cellpose_service.start_training(
    artifact=dataset,
    train_images="images/train/", train_annotations="annotations/train/",
    test_images="images/test/", test_annotations="annotations/test/",
    model="tiny", n_epochs=6, learning_rate=1e-3, validation_interval=1,
)
session_id = status["session_id"]

fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.5))
handle = display(fig, display_id=True)
bar = tqdm(total=6, unit="epoch")
while status["status_type"] not in ("completed", "failed", "stopped"):
    await asyncio.sleep(1)
    status = await cellpose_service.get_training_status(session_id)
    bar.n = status.get("current_epoch") or 0
    bar.set_description(status["status_type"]); bar.refresh()
    epochs = np.arange(1, len(status["train_losses"]) + 1)
    ax_loss.clear(); ax_f1.clear()
    ax_loss.plot(epochs, status["train_losses"], "o-", label="train loss")
    ax_loss.plot(epochs, [t if t is not None else np.nan for t in status["test_losses"]], "s--", label="test loss")
    ax_loss.set_xlabel("epoch"); ax_loss.legend(); ax_loss.set_title("Loss")
    f1 = [m["f1"] if m else np.nan for m in status["test_metrics"]]
    ax_f1.plot(epochs, f1, "o-", color="tab:green"); ax_f1.set_ylim(0, 1)
    ax_f1.set_xlabel("epoch"); ax_f1.set_title("Validation F1 (foreground pixels)")
    handle.update(fig)
bar.close()
fig.tight_layout(); fig.savefig(OUT / "training.png", dpi=100, bbox_inches="tight")
plt.close(fig)
print(status["status_type"], "-", status["message"])"""),
    MD(
        "## 5. The starting model and the fine-tuned model, side by side\n\n`diameter=None` means *no rescaling* (cellpose 4 has no size model). The tiny network trained for a few epochs on five images will not segment well; with `cpsam` the same code shows the real improvement."
    ),
    CODE("""from cellpose_finetuning.engine.plots import overlay_masks

image = tifffile.imread(DEV / "images/test/nuclei_03.tif")
truth = tifffile.imread(DEV / "annotations/test/nuclei_03.tif")
before = (await cellpose_service.infer(model="tiny", input_arrays=[image], cellprob_threshold=-3))[0]["output"]
after = (await cellpose_service.infer(model=session_id, input_arrays=[image], cellprob_threshold=-3))[0]["output"]

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, masks, title in zip(axes, (truth, before, after), ("ground truth", "starting model", "fine-tuned")):
    ax.imshow(overlay_masks(image, masks)); ax.set_title(f"{title}: {len(np.unique(masks)) - 1} objects"); ax.axis("off")
fig.tight_layout(); fig.savefig(OUT / "comparison.png", dpi=100, bbox_inches="tight")
plt.show()"""),
    MD(
        "## 6. Instance metrics on the test set\n\nComputed at the end of training by full cellpose inference: average precision at IoU 0.5, 0.75 and 0.9 (Hungarian matching)."
    ),
    CODE("""im = status["instance_metrics"]
print(f"AP@0.5={im['ap_0_5']}  AP@0.75={im['ap_0_75']}  AP@0.9={im['ap_0_9']}  true={im['n_true']}  predicted={im['n_pred']}")"""),
    MD(
        "## 7. Export to BioImage.IO and download the package\n\nThe package is validated with `bioimageio.spec` before it is uploaded. The thresholds are baked into the exported model; the undertrained tiny network needs permissive ones to find any object (bioimage.io needs a non-empty test output)."
    ),
    CODE("""import httpx, zipfile
from cellpose_finetuning.export.bioimageio import validate_package

export = await cellpose_service.export_model(
    session_id=session_id, model_name="tutorial-model",
    collection="bioimage-io/colab-annotations", flow_threshold=0.0, cellprob_threshold=-3.0,
)
print(export["artifact_url"])
async with httpx.AsyncClient(timeout=120, follow_redirects=True) as client:
    response = await client.get(export["download_url"])
zip_path = work / "tutorial-model.zip"
zip_path.write_bytes(response.content)
print(sorted(zipfile.ZipFile(zip_path).namelist()))
print("validation errors:", validate_package(zip_path))"""),
    MD("## 8. Find models by the dataset they were trained on"),
    CODE("""for model in await cellpose_service.list_models_by_dataset(dataset_id=dataset):
    print(model["name"], model["id"], model["url"])"""),
    MD("## 9. Clean up"),
    CODE("""await server.disconnect()
stop.set()
await service_task"""),
]

nb = nbf.v4.new_notebook(
    cells=cells,
    metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    },
)
nbf.write(nb, Path(__file__).with_name("tutorial.ipynb"))
