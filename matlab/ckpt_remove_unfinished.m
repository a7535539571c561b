function removed = ckpt_remove_unfinished(folder)
%CKPT_REMOVE_UNFINISHED  Delete the debris of saves that were killed: '.tmp-' files and
%   checkpoints without a completion marker. Returns the removed names; prints each.
%   removed = ckpt_remove_unfinished('checkpoints')
%   Run it at start-up, before the first save, while no other process saves there.
  removed = {};
  if ~isfolder(folder)
    return;
  end
  listing = dir(folder);
  temp_names = {listing.name};
  temp_names = temp_names(strncmp(temp_names, '.tmp-', 5));
  unfinished = {};
  for name = ckpt_checkpoint_names(folder)
    if ~isfile(fullfile(folder, [name{1} '.json']))
      unfinished{end + 1} = name{1};  %#ok<AGROW>
    end
  end
  for name = [reshape(temp_names, 1, []), unfinished]
    delete(fullfile(folder, name{1}));
    ckpt_print('removed unfinished save %s\n', name{1});
    removed{end + 1} = name{1};  %#ok<AGROW>
  end
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! assert (ckpt_remove_unfinished (folder), {});
%! ckpt_save (folder, struct ('x', 1), 1);
%! for name = {'.tmp-step_00000002.mat', '.tmp-last.txt', 'step_00000003.mat', 'notes.mat'}
%!   fclose (fopen (fullfile (folder, name{1}), 'w'));
%! end
%! printed = evalc ('removed = ckpt_remove_unfinished (folder);');
%! assert (sort (removed), {'.tmp-last.txt', '.tmp-step_00000002.mat', 'step_00000003.mat'});
%! assert (! isempty (strfind (printed, 'removed unfinished save step_00000003.mat')));
%! listing = dir (folder);
%! assert (sort ({listing.name}), {'.', '..', 'last.txt', 'notes.mat', ...
%!                                 'step_00000001.mat', 'step_00000001.mat.json'});
%! rmdir (folder, 's');
