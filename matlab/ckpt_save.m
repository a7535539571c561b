function info = ckpt_save(folder, checkpoint, step, kind)
%CKPT_SAVE  Save a checkpoint atomically, write its completion marker, move last.txt.
%   info = ckpt_save('checkpoints', checkpoint, step)          % kind 'step'
%   info = ckpt_save('checkpoints', checkpoint, step, 'time')  % or 'preempt'
%
%   checkpoint: a struct holding everything the run needs to continue (the step, its
%   data, the RNG state from ckpt_rng_state). It is saved as the variable 'checkpoint' in a
%   MAT file of format -v6 (read by MATLAB, Octave and scipy.io.loadmat; variables up to
%   2 GB each). Not -v7: its compressed bytes cannot be checked before load, and load can
%   run code (see ckpt_check_plain_mat).
%
%   The order is what makes a kill at any moment harmless:
%     1. save to '.tmp-<name>' in the same folder        (a kill leaves debris only)
%     2. sha256 and size of those bytes
%     3. rename it to '<kind>_<step>.mat'                (atomic)
%     4. write '<name>.json', the completion marker, atomically and LAST
%     5. point 'last.txt' at the new checkpoint
%   A checkpoint counts only once its marker exists and its bytes match the marker.
%   Neither MATLAB nor Octave can fsync a file, so after a power cut of the node the
%   newest file may be damaged; the sha256 check then skips it and the one before is used.
%   Returns the marker as a struct (name, path, step, kind, size, sha256, saved_at).
%   Only one process may save into a folder.
  if nargin < 4
    kind = 'step';
  end
  if ~any(strcmp(kind, {'step', 'time', 'preempt'}))
    error('ckpt:badKind', 'ckpt_save: kind must be step, time or preempt, not ''%s''', kind);
  end
  if ~isfolder(folder)
    mkdir(folder);
  end
  name = sprintf('%s_%08d.mat', kind, step);
  final_path = fullfile(folder, name);
  marker_path = [final_path '.json'];
  if isfile(marker_path)
    % Saving again under the same name: drop the old marker first, so that a kill during
    % this save leaves a file without a marker (ignored), never a marker that lies.
    delete(marker_path);
  end
  temp_path = fullfile(folder, ['.tmp-' name]);
  try
    save(temp_path, 'checkpoint', '-v6');
    listing = dir(temp_path);
    size_bytes = listing.bytes;
    digest = ckpt_sha256_file(temp_path);
    ckpt_rename(temp_path, final_path);
  catch failure
    if isfile(temp_path)
      delete(temp_path);
    end
    rethrow(failure);
  end
  info = struct('name', name, 'path', final_path, 'step', step, 'kind', kind, ...
                'size', size_bytes, 'sha256', digest, ...
                'saved_at', datestr(now(), 'yyyy-mm-ddTHH:MM:SS.FFF'));
  marker = rmfield(info, 'path');
  marker.format_version = 1;
  marker.saved_by = runtime_name();
  ckpt_write_text_atomic(marker_path, jsonencode(marker));
  ckpt_write_text_atomic(fullfile(folder, 'last.txt'), sprintf('%s\n', name));
end

function text = runtime_name()
  if exist('OCTAVE_VERSION', 'builtin')
    text = ['Octave ' OCTAVE_VERSION];
  else
    text = ['MATLAB ' version()];
  end
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! checkpoint = struct ('step', 400, 'x', magic (4));
%! info = ckpt_save (folder, checkpoint, 400);
%! assert (info.name, 'step_00000400.mat');
%! listing = dir (folder);
%! assert (sort ({listing.name}), ...
%!         {'.', '..', 'last.txt', 'step_00000400.mat', 'step_00000400.mat.json'});
%! marker = jsondecode (fileread ([info.path '.json']));
%! assert (marker.step, 400);
%! assert (marker.kind, 'step');
%! assert (marker.size, dir (info.path).bytes);
%! assert (marker.sha256, ckpt_sha256_file (info.path));
%! assert (ckpt_read_last_pointer (folder), 'step_00000400.mat');
%! loaded = load (info.path);
%! assert (loaded.checkpoint, checkpoint);
%! rmdir (folder, 's');

%!test
%! % a save that fails leaves no temp file and no marker behind
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! ckpt_save (folder, struct ('x', 1), 1);
%! fail ('ckpt_save (folder, struct (''x'', 2), 2, ''weekly'')', 'kind must be');
%! listing = dir (folder);
%! assert (sort ({listing.name}), {'.', '..', 'last.txt', 'step_00000001.mat', 'step_00000001.mat.json'});
%! rmdir (folder, 's');
