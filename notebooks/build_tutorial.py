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

It runs top to bottom with the *tiny* network, trained from scratch on three small nuclei
images (a minute or two on a CPU), so that it can be tested on every change. With a GPU and
real data, use `model="cpsam"` and `recipe="cellpose"` (cellpose's fine-tuning settings:
learning rate 1e-5, weight decay 0.1, 100 epochs)."""),
    MD(
        "## 1. Start a local service\n\nNormally you run `make serve` (or `cellpose-finetuning serve`) once in a terminal and skip this cell. Here the notebook starts its own embedded stack (SeaweedFS + Hypha) in a temporary folder on free ports."
    ),
    CODE("""import asyncio, os, random, tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
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
    MD("""## 4. Train, watching the loss and the validation F1 live

The untrained *tiny* network needs settings that let it learn from scratch: recipe
`from-scratch` (learning rate 3e-3, weight decay 0.1, 60 epochs of 16 tiles in batches of 4). We train on the three
nuclei images (pattern form: `*` parts must match). Before epoch 1 the service scores the starting
model on the test image; the grey line is that baseline AP@0.5."""),
    CODE("""from tqdm.auto import tqdm

N_EPOCHS = 60  # the recipe's
status = await cellpose_service.start_training(
    artifact=dataset,
    train_images="images/train/nuclei_*.tif", train_annotations="annotations/train/nuclei_*.tif",
    test_images="images/test/nuclei_*.tif", test_annotations="annotations/test/nuclei_*.tif",
    model="tiny", recipe="from-scratch", validation_interval=5,
)
session_id = status["session_id"]
print(status.get("warnings", "no warnings"))

fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.5))
handle = display(fig, display_id=True)
bar = tqdm(total=N_EPOCHS, unit="epoch")
while status["status_type"] not in ("completed", "failed", "stopped"):
    await asyncio.sleep(1)
    status = await cellpose_service.get_training_status(session_id)
    bar.n = status.get("current_epoch") or 0
    bar.set_description(status["status_type"]); bar.refresh()
    epochs = np.arange(1, len(status["train_losses"]) + 1)
    ax_loss.clear(); ax_f1.clear()
    ax_loss.plot(epochs, status["train_losses"], "-", label="train loss")
    ax_loss.plot(epochs, [t if t is not None else np.nan for t in status["test_losses"]], "s", label="test loss")
    ax_loss.set_xlabel("epoch"); ax_loss.legend(); ax_loss.set_title("Loss")
    f1 = [m["f1"] if m else np.nan for m in status["test_metrics"]]
    ax_f1.plot(epochs, f1, "o", color="tab:green", label="F1 (pixels)")
    if status.get("base_instance_metrics"):
        ax_f1.axhline(status["base_instance_metrics"]["ap_0_5"], color="grey", ls=":", label="AP@0.5 base")
    if status.get("instance_metrics"):
        ax_f1.plot([epochs[-1]], [status["instance_metrics"]["ap_0_5"]], "D", color="black", label="AP@0.5 fine-tuned")
    ax_f1.set_ylim(0, 1); ax_f1.legend(loc="upper left")
    ax_f1.set_xlabel("epoch"); ax_f1.set_title("Validation")
    handle.update(fig)
bar.close()
fig.tight_layout(); fig.savefig(OUT / "training.png", dpi=100, bbox_inches="tight")
plt.close(fig)
print(status["status_type"], "-", status["message"])"""),
    MD(
        "## 5. Did fine-tuning help? The starting and the fine-tuned model, side by side\n\n`evaluate` scores any models (here the untrained `tiny` and our session) on a labelled dataset with the same inference settings: AP at IoU 0.5/0.75/0.9 and precision, recall and F1 at 0.5, per image and for the set, plus a bar chart and overlays. `diameter=None` means *no rescaling* (cellpose 4 has no size model)."
    ),
    CODE("""from IPython.display import Image, Markdown

result = await cellpose_service.evaluate(
    models=["tiny", session_id], artifact=dataset,
    test_images="images/test/nuclei_*.tif", test_annotations="annotations/test/nuclei_*.tif",
)
display(Markdown(result["markdown"]))
(OUT / "comparison.png").write_bytes(result["overlays_png"])
display(Image(data=result["overlays_png"]))
base, tuned = (m["metrics"]["ap_0_5"] for m in result["report"]["models"])
print(f"AP@0.5 {base:.2f} -> {tuned:.2f} ({tuned - base:+.2f})")"""),
    MD(
        "## 6. Instance metrics recorded by the training run\n\nComputed by the run itself, by full cellpose inference on the test set: before epoch 1 (`base_instance_metrics`) and at the end (`instance_metrics`), with cellpose's Hungarian matching. They are the same numbers `evaluate` gave."
    ),
    CODE("""for key in ("base_instance_metrics", "instance_metrics"):
    im = status[key]
    print(f"{key:22s} AP@0.5={im['ap_0_5']:.3f}  AP@0.75={im['ap_0_75']:.3f}  AP@0.9={im['ap_0_9']:.3f}  "
          f"F1@0.5={im['f1_0_5']:.3f}  true={im['n_true']}  predicted={im['n_pred']}")"""),
    MD(
        "## 7. Export to BioImage.IO and download the package\n\nThe package is validated with `bioimageio.spec` before it is uploaded. The thresholds are baked into the exported model (bioimage.io needs a non-empty test output; permissive ones keep a barely trained network exportable)."
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
