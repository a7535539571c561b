function [checkpoint, info] = ckpt_load_latest(folder)
%CKPT_LOAD_LATEST  Load the newest valid checkpoint of a folder, for a resume.
%   [checkpoint, info] = ckpt_load_latest('checkpoints')
%   checkpoint is the struct given to ckpt_save, or [] when there is no valid checkpoint
%   (start fresh). info is its marker (name, step, ...). A checkpoint that fails is skipped
%   with one printed line that names it and says why, and moved to corrupt/ in the folder
%   with its marker (ckpt_quarantine): damaged or unsafe (ckpt_find_latest_valid says
%   why), bytes that match the marker but that load cannot read, no variable
%   'checkpoint', a marker that cannot be read. The next newest is tried then: a damaged
%   file never stops the job. last.txt is pointed at the checkpoint loaded.

  % Exercise ex04-auto-resume, task 3: write this function in place of the error() below.
  % Generated from matlab/ckpt_load_latest.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex04
  error('ckpt:todo', 'TODO: Task 3: Resume from the newest valid checkpoint (see README.md)');
end

function [checkpoint, reason] = read_checkpoint(path, name)
  checkpoint = [];
  reason = '';
  try
    contents = load(path, '-mat');  % as a MAT file, whatever its bytes claim to be
  catch failure
    message = strrep(strrep(failure.message, path, name), sprintf('\n'), ' ');
    reason = sprintf('%s: its bytes match the marker, but load cannot read them (%s)', ...
                     name, message);
    return;
  end
  if ~isfield(contents, 'checkpoint')
    reason = sprintf('%s: holds no variable ''checkpoint''', name);
    return;
  end
  checkpoint = contents.checkpoint;
end

function quarantine_unreadable_markers(folder)
  % A marker is written whole or not at all (ckpt_write_text_atomic): one that cannot be
  % read was damaged afterwards. Its checkpoint is never a candidate (ckpt_list leaves it
  % out), so without this it would stay in the folder for good, unchecked and unrotated.
  for name = ckpt_checkpoint_names(folder)
    [info, reason] = ckpt_read_marker(fullfile(folder, name{1}));
    if isempty(info) && isfile(fullfile(folder, [name{1} '.json']))
      ckpt_print('skipped corrupt checkpoint: %s\n', reason);
      ckpt_quarantine(folder, name{1});
    end
  end
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
