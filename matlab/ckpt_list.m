function infos = ckpt_list(folder)
%CKPT_LIST  Every checkpoint in a folder that has a readable completion marker.
%   infos = ckpt_list('checkpoints')
%   A struct array (see ckpt_read_marker), oldest first by step, then by save time. The
%   order never depends on file modification times, which copies, restores and clock skew
%   between nodes all change. Checksums are not checked here: see ckpt_find_latest_valid.
  infos = struct('name', {}, 'path', {}, 'step', {}, 'kind', {}, 'size', {}, ...
                 'sha256', {}, 'saved_at', {});
  for name = ckpt_checkpoint_names(folder)
    info = ckpt_read_marker(fullfile(folder, name{1}));
    if ~isempty(info)
      infos(end + 1) = info;  %#ok<AGROW>
    end
  end
  if isempty(infos)
    return;
  end
  [~, order] = sort({infos.saved_at});   % ties of step: the later save last
  infos = infos(order);
  [~, order] = sort([infos.step]);       % sort is stable in MATLAB and Octave
  infos = infos(order);
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! assert (numel (ckpt_list (folder)), 0);
%! ckpt_save (folder, struct ('x', 1), 20);
%! ckpt_save (folder, struct ('x', 1), 100, 'time');
%! ckpt_save (folder, struct ('x', 1), 3);
%! fclose (fopen (fullfile (folder, 'step_00000500.mat'), 'w'));  % no marker: not listed
%! infos = ckpt_list (folder);
%! assert ({infos.name}, {'step_00000003.mat', 'step_00000020.mat', 'time_00000100.mat'});
%! rmdir (folder, 's');
