"""Learners: a group of Ray actors that form one torch.distributed group and update the student.

- `spec.LearnerSpec`: every learner setting, built once from the config and passed whole.
- `deepspeed_backend.DeepSpeedLearner`: one rank's DeepSpeed engine (ZeRO 0-3), loss, skip logic.
- `worker.LearnerWorker`: the process around it (env, threads, init_distributed); the Ray actor.
- `group.LearnerGroup`: the driver's handle: placement group, spawning, deadlines, sharding.

Nothing is imported here on purpose: importing DeepSpeed must wait until `rayd.device` has set
the accelerator for the process, which only the worker does.
"""
