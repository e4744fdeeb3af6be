"""Stage 06: install a model as a portable, self-contained folder (model/, model_info.json, config.yaml,
start.sh, install.log, SHA256SUMS), and manage installed models.

    python 06_install.py install --config config/default.yaml      # this pipeline's export, as "homellm"
    python 06_install.py install path/to/hf_model_dir --name mymodel
    python 06_install.py install ~/Downloads/model.Q4_K_M.gguf      # converted to safetensors on the way
    python 06_install.py install HuggingFaceTB/SmolLM2-135M-Instruct --venv   # hub id: needs network
    python 06_install.py list
    python 06_install.py info mymodel
    python 06_install.py remove mymodel
    python 06_install.py config ~/LLM/models                        # show (no argument) or set the models dir

Models go to ~/LLM/models/<name> unless --models-dir, install.models_dir in the config, or `config DIR` say
otherwise. The model is checked first (05_check's report is reused when current) and refused if it cannot run
here. An existing install is replaced only after a yes, or with --force.
"""

from lib.cli import stage_main
from lib.install.commands import run_install

COMMANDS = ("install", "list", "info", "remove", "config", "train")


def add_args(parser):
    parser.add_argument("command", choices=COMMANDS, help="what to do")
    parser.add_argument("target", nargs="?", default=None,
                        help="install: model dir, .gguf file or hub id (default: the pipeline's export); "
                             "info/remove/train: an installed name (or folder); config: the models dir to set")
    parser.add_argument("data", nargs="?", default=None,
                        help="train: the fine-tuning data (a file or folder in any format 04_sft reads)")
    parser.add_argument("--name", default=None, help="install under this name (default: from the model); train: the "
                                                     "adapter's name (default: lora-<date>)")
    parser.add_argument("--models-dir", default=None, help="where installed models live (default: ~/LLM/models)")
    parser.add_argument("--force", action="store_true", help="replace an existing install / remove without asking")
    parser.add_argument("--yes", action="store_true", help="remove without asking")
    parser.add_argument("--venv", action="store_true", help="create an isolated venv inside the install")
    parser.add_argument("--no-test", action="store_true", help="skip the post-install load-and-generate test")
    parser.add_argument("--quantize", choices=["q4_k_m", "q5_k_m", "q8_0", "f16"], default=None,
                        help="install a chat model as a llama.cpp GGUF of this quantization (default: as it came; "
                             "05_check lists the memory each needs and suggests one; f16: converted, not quantized)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="train: start TensorBoard on 127.0.0.1 over the run's logs while it trains")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model whose config asks for its own Python code (off by default)")


def main(argv=None) -> int:
    return stage_main(__doc__.split("\n\n")[0], run_install, argv, add_args,
                      shows_config=lambda args: args.command == "install")


if __name__ == "__main__":
    raise SystemExit(main())
