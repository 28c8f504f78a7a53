"""On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", GKD; MiniLLM's reverse KL): for a fraction --lmbda of the micro-batches the
student samples the responses itself, from its live training weights, with the engine's own decoder;
a frozen teacher (engine/train/teacher.py) scores every token of them, and the student learns the
teacher's next-token distribution there (--divergence forward_kl | reverse_kl | jsd, on the vocabulary
shards: models/vocab_parallel.py). The other micro-batches use the data file's rationales (supervised
KD), or with --seq_kd True the teacher's own samples (sequence-level KD).

  args.py      the flags (OnPolicyArgs: train.py --objective on_policy)
  sampling.py  who writes a micro-batch's responses, their seeds, and the decoder call
  task.py      the Task: micro-batches (sampled or from the file), the divergence, the step's metrics
"""
