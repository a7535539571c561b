function [ok, reason, info] = ckpt_verify(checkpoint_path)
%CKPT_VERIFY  Check that a checkpoint is complete: its marker exists and its bytes match.
%   [ok, reason, info] = ckpt_verify('checkpoints/step_00000400.mat')
%   ok is true when the completion marker is readable and the file has the size and
%   sha256 the marker records; otherwise reason says what is wrong (no marker, missing,
%   truncated, bytes changed). info is the marker (see ckpt_read_marker), [] without one.

  % Exercise ex04-auto-resume, task 1: write this function in place of the error() below.
  % Generated from matlab/ckpt_verify.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex04
  error('ckpt:todo', 'TODO: Task 1: Verify a checkpoint against its marker (see README.md)');
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! info = ckpt_save (folder, struct ('x', 1:1000), 10);
%! [ok, reason] = ckpt_verify (info.path);
%! assert (ok); assert (reason, '');
%! % same size, one byte changed
%! fid = fopen (info.path, 'r+'); fseek (fid, 200, 'bof'); byte = fread (fid, 1, 'uint8');
%! fseek (fid, 200, 'bof'); fwrite (fid, bitxor (byte, 1), 'uint8'); fclose (fid);
%! [ok, reason] = ckpt_verify (info.path);
%! assert (! ok);
%! assert (reason, 'step_00000010.mat: sha256 does not match the marker (the bytes were changed)');
%! % truncated
%! bytes = fileread (info.path);
%! fid = fopen (info.path, 'w'); fwrite (fid, bytes(1:100)); fclose (fid);
%! [ok, reason] = ckpt_verify (info.path);
%! assert (! ok);
%! assert (! isempty (strfind (reason, '100 bytes on disk')));
%! delete (info.path);
%! [ok, reason] = ckpt_verify (info.path);
%! assert (! ok);
%! assert (reason, 'step_00000010.mat: file is missing');
%! rmdir (folder, 's');
