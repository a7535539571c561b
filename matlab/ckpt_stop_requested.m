function stop = ckpt_stop_requested(stop_file)
%CKPT_STOP_REQUESTED  True when the batch shell has asked the job to save and stop.
%   if ckpt_stop_requested(stop_file), ...save, exit(75)..., end
%   MATLAB and Octave cannot be relied on to catch SIGUSR1 or SIGTERM themselves, so
%   job.sbatch traps the signal in the batch shell and creates stop_file; the loop calls
%   this at the end of every iteration. It is one stat() of a file: keep stop_file on a
%   node-local disk (job.sbatch uses $TMPDIR or /tmp), not on a network file system.
%   An empty stop_file means no stop was asked for.
  stop = ~isempty(stop_file) && isfile(stop_file);
end

%!test
%! flag = tempname ();
%! assert (ckpt_stop_requested (''), false);
%! assert (ckpt_stop_requested (flag), false);
%! fclose (fopen (flag, 'w'));
%! assert (ckpt_stop_requested (flag), true);
%! delete (flag);
