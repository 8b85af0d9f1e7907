"""The user simulator's fidelity, and a user model fine-tuned to raise it (EigenData).

`fidelity` probes a simulator with scripted agent turns and checks its replies (and gates
RL on them); `dialogues` turns tasks into gold-action conversations, the user model's SFT
data; `finetune` trains and serves that model as a LoRA adapter. The `sentinel usersim`
command lives in `sentinel.cli.usersim`.
Nothing is imported here, so `sentinel --help` stays fast.
"""
