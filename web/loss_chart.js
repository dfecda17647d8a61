// Live loss chart for the SDXL LoRA Trainer (filled in by the live-feedback work).
import { app } from "../../scripts/app.js";

app.registerExtension({ name: "sdxl_lora_trainer.loss_chart" });
