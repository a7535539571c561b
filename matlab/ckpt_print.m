function ckpt_print(format, varargin)
%CKPT_PRINT  fprintf a line to standard output and flush it at once.
%   ckpt_print('step %d/%d\n', step, total)
%   Octave buffers standard output when it goes to a file (a Slurm output file), so
%   without the flush the progress lines of a killed job would be lost. MATLAB has no
%   fflush for standard output and needs none.
  fprintf(1, format, varargin{:});
  if exist('OCTAVE_VERSION', 'builtin')
    fflush(stdout);
  end
end

%!test
%! printed = evalc ('ckpt_print (''step %d/%d\n'', 5, 10)');
%! assert (printed, sprintf ('step 5/10\n'));
