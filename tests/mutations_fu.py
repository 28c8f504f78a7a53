"""Break each of the authors' variants of teacher_kl / make_formats on purpose, one at a time, and check
that a test fails (issue 21).

  .venv/bin/python tests/mutations_fu.py [--only NAME,NAME] [--list] [--control]

The runner: tests/mutation_runner.py (a scratch copy of the tree; prints caught / SURVIVED)."""
from __future__ import annotations

import sys

from mutation_runner import main

A = "tests/test_teacher_kl_authors.py"
K = "tests/test_teacher_kl.py"

# (name, file, old snippet, new snippet, tests: pytest node ids)
MUTATIONS = [
    ("raw targets renormalised anyway", "engine/distill/teacher_kl/teachers.py",
     "probs = torch.where(keep, logprobs.float().exp(), 0.0)",
     "probs = torch.where(keep, logprobs.float().exp(), 0.0); probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)",
     [f"{A}::test_raw_targets_of_the_notebook_example", f"{A}::test_the_step_equals_the_authors_loss_at_tp1_and_tp2"]),
    ("raw targets without the teacher's own token", "engine/distill/teacher_kl/teachers.py",
     "t_ids = np.concatenate([tokens[cols][:, None], topk_ids[cols]], axis=1)\n"
     "        t_lp = np.concatenate([own_logprobs[cols][:, None], topk_logprobs[cols]], axis=1)",
     "t_ids = np.concatenate([topk_ids[cols][:, :1], topk_ids[cols]], axis=1)\n"
     "        t_lp = np.concatenate([topk_logprobs[cols][:, :1], topk_logprobs[cols]], axis=1)",
     [f"{A}::test_raw_targets_of_the_notebook_example", f"{A}::test_the_step_equals_the_authors_loss_at_tp1_and_tp2"]),
    ("raw targets keep duplicates", "engine/distill/teacher_kl/teachers.py",
     "keep = (mapped >= 0) & ~seen", "keep = mapped >= 0",
     [f"{A}::test_raw_targets_drop_duplicates_and_unmapped_tokens", f"{A}::test_raw_targets_of_the_notebook_example"]),
    ("online raw targets without the teacher's own token", "engine/distill/teacher_kl/teachers.py",
     "r_ids, r_p = raw_targets(torch.cat([t_own[:, None], torch.cat(t_ids)], dim=1),\n"
     "                                     torch.cat([torch.cat(t_own_lp)[:, None], torch.cat(t_logp)], dim=1),",
     "r_ids, r_p = raw_targets(torch.cat(t_ids),\n"
     "                                     torch.cat(t_logp),",
     [f"{A}::test_online_teacher_equals_its_file_under_the_authors_flags"]),
    ("EOS one-hot dropped (teacher file)", "engine/distill/teacher_kl/teachers.py",
     "            if self.eos_one_hot:  # the EOS learns EOS", "            if False:  # the EOS learns EOS",
     [f"{A}::test_raw_targets_of_the_notebook_example", f"{A}::test_the_step_equals_the_authors_loss_at_tp1_and_tp2"]),
    ("EOS one-hot dropped (online teacher)", "engine/distill/teacher_kl/teachers.py",
     "eos = own == self.eos_id if self.eos_one_hot else None", "eos = None",
     [f"{A}::test_dense_online_teacher_learns_eos_one_hot",
      f"{A}::test_online_teacher_equals_its_file_under_the_authors_flags"]),
    ("DTW ties: student step before teacher step", "engine/distill/teacher_kl/alignment.py",
     "move = min(range(3), key=lambda k: options[k])", "move = min((0, 2, 1), key=lambda k: options[k])",
     [f"{A}::test_authors_alignment_on_hand_cases", f"{A}::test_authors_alignment_equals_the_reference_on_random_sequences"]),
    ("DTW ties: diagonal last", "engine/distill/teacher_kl/alignment.py",
     "move = min(range(3), key=lambda k: options[k])", "move = min((1, 2, 0), key=lambda k: options[k])",
     [f"{A}::test_authors_alignment_on_hand_cases"]),
    ("DTW cost counts spaces", "engine/distill/teacher_kl/alignment.py",
     't = [(x or "").replace(" ", "") for x in teacher]', 't = [(x or "") for x in teacher]',
     [f"{A}::test_authors_alignment_on_hand_cases", f"{A}::test_authors_alignment_on_the_notebook_examples"]),
    ("copy rule two-sided", "engine/distill/teacher_kl/alignment.py",
     "return [ts[0] if len(ts) == 1 and student[k] is not None",
     "return [ts[0] if len(ts) == 1 and sum(ts[0] in m for m in mapped) == 1 and student[k] is not None",
     [f"{A}::test_authors_alignment_on_the_notebook_examples", f"{A}::test_authors_alignment_on_hand_cases"]),
    ("--alignment authors ignored", "engine/distill/teacher_kl/alignment.py",
     '    if rule == "authors":\n        match = authors_alignment(a, b)', '    if False:\n        match = authors_alignment(a, b)',
     [f"{A}::test_raw_targets_of_the_notebook_example"]),
    ("--kl_formats ignored (the mixture on every batch)", "engine/distill/teacher_kl/task.py",
     "        if self.kl_formats is None:\n            return (\"ce\", \"kl\")",
     "        if True:\n            return (\"ce\", \"kl\")",
     [f"{A}::test_the_step_equals_the_authors_loss_at_tp1_and_tp2"]),
    ("--loss_reduction micro_batch_mean ignored", "engine/distill/teacher_kl/task.py",
     'self.micro_batch_mean = reduction == "micro_batch_mean"', "self.micro_batch_mean = False",
     [f"{A}::test_the_step_equals_the_authors_loss_at_tp1_and_tp2"]),
    ("KL gradient assumes a normalised target", "models/vocab_parallel.py",
     "mass = all_reduce_tp_(p.sum(dim=-1))", "mass = torch.ones_like(p.sum(dim=-1))",
     [f"{A}::test_kl_core_against_the_authors_formula_at_tp1_and_tp2",
      f"{A}::test_the_step_equals_the_authors_loss_at_tp1_and_tp2"]),
    ("KL direction swapped (reverse KL on the target's support)", "models/vocab_parallel.py",
     "per_row = all_reduce_tp_((torch.xlogy(p, p) - p * log_q).sum(dim=-1))",
     "per_row = all_reduce_tp_(torch.where(p > 0, log_q.exp() * (log_q - p.clamp(min=1e-30).log()), 0.0).sum(dim=-1))",
     [f"{A}::test_kl_core_against_the_authors_formula_at_tp1_and_tp2"]),
    ("DenseTarget one-hot rows ignored", "models/vocab_parallel.py",
     "        if target.one_hot is not None:", "        if False:",
     [f"{A}::test_kl_core_against_the_authors_formula_at_tp1_and_tp2", f"{A}::test_dense_online_teacher_learns_eos_one_hot"]),
    ("sharded_token_logprobs not reduced over shards", "models/vocab_parallel.py",
     "return all_reduce_tp_(torch.where(here, picked, 0.0)) - log_norm",
     "return torch.where(here, picked, 0.0) - log_norm",
     [f"{A}::test_kl_core_against_the_authors_formula_at_tp1_and_tp2", f"{K}::test_score_top_k_equals_the_full_log_softmax"]),
    ("infer.py score: token_logprobs one token late", "engine/infer/jobs.py",
     "[round(v, 6) for v in own[start:start + n]]", "[round(v, 6) for v in own[start + 1:start + n + 1]]",
     [f"{K}::test_score_top_k_equals_the_full_log_softmax"]),
    ("formats: zero-shot answer prompt with a newline", "data/make_formats.py",
     'else "\\nA:" if icl else " A:")', 'else "\\nA:")', [f"{A}::test_authors_formats_equal_the_reference"]),
    ("formats: calculator annotations kept", "data/make_formats.py",
     'return CALC_ANNOTATION.sub("", steps), final.strip()', "return steps, final.strip()",
     [f"{A}::test_authors_formats_equal_the_reference"]),
    ("formats: wrong teacher outputs kept", "data/make_formats.py",
     "correct = [j for j, o in enumerate(_outputs(rec)) if is_correct(extract_answer(o, task), rec[\"label\"], task)]",
     "correct = list(range(len(_outputs(rec))))", [f"{A}::test_authors_formats_equal_the_reference"]),
    ("formats: gold answer instead of the teacher's answer sentence", "data/make_formats.py",
     "first = next(((j, a) for j, a in stated if a is not None), None)",
     "first = next(((j, answer_only(rec['label'])) for j, a in stated if a is not None), None)",
     [f"{A}::test_authors_formats_equal_the_reference"]),
    ("formats: demonstrations drawn once per question", "data/make_formats.py",
     "_draw(len(demos), num_demos, seed, i, fmt, j)", "_draw(len(demos), num_demos, seed, i, fmt)",
     [f"{A}::test_authors_formats_equal_the_reference"]),
    ("formats: the missing-output check removed (KeyError again)", "data/make_formats.py",
     "        validate_training_records(records, path)  # one sentence", "        pass  # one sentence",
     [f"{A}::test_demo_file_in_our_style_and_records_without_output"]),
]


if __name__ == "__main__":
    sys.exit(main(MUTATIONS))
