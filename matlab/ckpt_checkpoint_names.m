function names = ckpt_checkpoint_names(folder)
%CKPT_CHECKPOINT_NAMES  Names of the checkpoint files in a folder, marker or not.
%   names = ckpt_checkpoint_names('checkpoints')   % a 1-by-N cell, e.g. {'step_00000400.mat'}
%   Only names ckpt_save makes count: step_, time_ or preempt_ and a step number. Other
%   .mat files in the folder (yours, or '.tmp-' debris) are left alone.
  names = {};
  if ~isfolder(folder)
    return;
  end
  listing = dir(fullfile(folder, '*.mat'));
  names = {listing.name};
  keep = ~cellfun(@isempty, regexp(names, '^(step|time|preempt)_\d+\.mat$', 'once'));
  names = names(keep);
  names = reshape(names, 1, []);
end

%!test
%! folder = tempname (); mkdir (folder);
%! confirm_recursive_rmdir (false, 'local');
%! for name = {'step_00000001.mat', 'time_00000002.mat', 'preempt_00000003.mat', ...
%!             '.tmp-step_00000004.mat', 'results.mat', 'step_00000001.mat.json'}
%!   fclose (fopen (fullfile (folder, name{1}), 'w'));
%! end
%! assert (sort (ckpt_checkpoint_names (folder)), ...
%!         {'preempt_00000003.mat', 'step_00000001.mat', 'time_00000002.mat'});
%! assert (ckpt_checkpoint_names (fullfile (folder, 'nowhere')), {});
%! rmdir (folder, 's');
