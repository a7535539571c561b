function codes = ckpt_exit_codes()
%CKPT_EXIT_CODES  The exit codes of a checkpointed MATLAB/Octave job, as in the Python kit.
%   codes = ckpt_exit_codes() returns a struct:
%     codes.finished  = 0    the computation finished
%     codes.requeued  = 3    stopped, checkpoint saved, job requeued (set by job.sbatch,
%                            which owns every Slurm command)
%     codes.preempted = 75   stopped, checkpoint saved, NOT requeued: resubmit to resume
%                            (75 is EX_TEMPFAIL, "try again later")
%   A program returns codes.finished or codes.preempted; the batch shell turns 75 into a
%   requeue and exits 3, or keeps 75 where it cannot requeue.
  codes = struct('finished', 0, 'requeued', 3, 'preempted', 75);
end

%!test
%! codes = ckpt_exit_codes();
%! assert ([codes.finished, codes.requeued, codes.preempted], [0, 3, 75]);
