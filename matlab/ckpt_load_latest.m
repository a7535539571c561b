function [checkpoint, info] = ckpt_load_latest(folder)
%CKPT_LOAD_LATEST  Load the newest valid checkpoint of a folder, for a resume.
%   [checkpoint, info] = ckpt_load_latest('checkpoints')
%   checkpoint is the struct given to ckpt_save, or [] when there is no valid checkpoint
%   (start fresh). info is its marker (name, step, ...). Damaged checkpoints are skipped
%   with a printed line (see ckpt_find_latest_valid). A file whose bytes match its marker
%   but cannot be loaded is an error, not a skip: nothing was damaged, so something else
%   is wrong (a MAT format this program cannot read, a name clash) and you must know.
  checkpoint = [];
  [path, info] = ckpt_find_latest_valid(folder);
  if isempty(path)
    return;
  end
  contents = load(path, '-mat');  % as a MAT file, whatever its bytes claim to be
  if ~isfield(contents, 'checkpoint')
    error('ckpt:noCheckpoint', '%s holds no variable ''checkpoint''', path);
  end
  checkpoint = contents.checkpoint;
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! [checkpoint, info] = ckpt_load_latest (folder);
%! assert (isempty (checkpoint)); assert (isempty (info));
%! ckpt_save (folder, struct ('step', 7, 'data', {{'a', [1 2 3]}}), 7);
%! [checkpoint, info] = ckpt_load_latest (folder);
%! assert (checkpoint.step, 7);
%! assert (checkpoint.data, {'a', [1 2 3]});
%! assert (info.name, 'step_00000007.mat');
%! rmdir (folder, 's');
