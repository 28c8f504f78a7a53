"""Implicit chain of thought via knowledge distillation (seed 003, METHODS.md section 5), on the
engine's decoders: train_implicit.py teacher | mind_read | emulator | couple | evaluate.

  data.py    `input||cot #### answer` lines and their tokens per model
  states.py  the CoT diagonal, same-depth layer mappings, state maps, reading/replacing layer inputs
  tasks.py   the four stages as trainer Tasks
  decode.py  greedy decoding (explicit and implicit), accuracy, the emulator's state error
  stages.py  prerequisites, loading, saving beside the model, running a stage, evaluating saved stages
  args.py    the flags of every stage
"""
