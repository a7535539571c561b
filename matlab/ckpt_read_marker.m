function [info, reason] = ckpt_read_marker(checkpoint_path)
%CKPT_READ_MARKER  Read a checkpoint's completion marker '<checkpoint>.json'.
%   [info, reason] = ckpt_read_marker('checkpoints/step_00000400.mat')
%   info: struct with name, path, step, kind, size, sha256, saved_at; empty ([]) when the
%   marker is missing or unreadable, and then reason says why. Never raises: a marker
%   left half-written by a crash must not stop a resume.
  info = [];
  reason = '';
  [~, name, extension] = fileparts(checkpoint_path);
  name = [name extension];
  marker_path = [checkpoint_path '.json'];
  if ~isfile(marker_path)
    reason = sprintf('%s: no completion marker (%s.json); the save did not finish', name, name);
    return;
  end
  try
    meta = jsondecode(fileread(marker_path));
  catch failure
    reason = sprintf('%s: unreadable completion marker (%s)', name, failure.message);
    return;
  end
  if ~has_marker_fields(meta)
    reason = sprintf('%s: completion marker lacks step, kind, size or sha256', name);
    return;
  end
  info = struct('name', name, 'path', checkpoint_path, 'step', meta.step, ...
                'kind', meta.kind, 'size', meta.size, 'sha256', meta.sha256, ...
                'saved_at', meta.saved_at);
end

function ok = has_marker_fields(meta)
  ok = isstruct(meta) && all(isfield(meta, {'step', 'kind', 'size', 'sha256', 'saved_at'})) ...
       && isnumeric(meta.step) && isscalar(meta.step) ...
       && isnumeric(meta.size) && isscalar(meta.size) ...
       && ischar(meta.sha256) && numel(meta.sha256) == 64 ...
       && ischar(meta.kind) && ischar(meta.saved_at);
end

%!test
%! folder = tempname (); mkdir (folder);
%! confirm_recursive_rmdir (false, 'local');
%! path = fullfile (folder, 'step_00000010.mat');
%! [info, reason] = ckpt_read_marker (path);
%! assert (isempty (info));
%! assert (reason, 'step_00000010.mat: no completion marker (step_00000010.mat.json); the save did not finish');
%! ckpt_write_text_atomic ([path '.json'], '{"step": 10, "kind": ');     % cut short
%! [info, reason] = ckpt_read_marker (path);
%! assert (isempty (info));
%! assert (strncmp (reason, 'step_00000010.mat: unreadable completion marker', 47));
%! ckpt_write_text_atomic ([path '.json'], '{"step": 10}');
%! [info, reason] = ckpt_read_marker (path);
%! assert (isempty (info));
%! assert (reason, 'step_00000010.mat: completion marker lacks step, kind, size or sha256');
%! rmdir (folder, 's');
