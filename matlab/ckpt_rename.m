function ckpt_rename(source, destination, method)
%CKPT_RENAME  Move a file over another in one atomic step (a rename in the same folder).
%   ckpt_rename(source, destination) replaces destination by source. Readers see the old
%   file or the new one, never a part: this is what makes a save atomic. Both paths must be
%   in the same folder (the same file system), or the move becomes a copy.
%   method: 'auto' (default) picks by runtime; 'octave' uses Octave's rename (a direct
%   rename(2), no shell); 'matlab' uses movefile(..., 'f'), which MATLAB implements as a
%   rename on the same file system. Both methods are run by the tests under Octave.
  if nargin < 3 || strcmp(method, 'auto')
    if exist('OCTAVE_VERSION', 'builtin')
      method = 'octave';
    else
      method = 'matlab';
    end
  end
  switch method
    case 'octave'
      [status, message] = rename(source, destination);
      moved = (status == 0);
    case 'matlab'
      [moved, message] = movefile(source, destination, 'f');
    otherwise
      error('ckpt:badMethod', 'ckpt_rename: unknown method ''%s''', method);
  end
  if ~moved
    error('ckpt:renameFailed', 'cannot rename %s to %s: %s', source, destination, message);
  end
end

%!test
%! folder = tempname (); mkdir (folder);
%! confirm_recursive_rmdir (false, 'local');
%! for method = {'octave', 'matlab'}
%!   old = fullfile (folder, 'target.txt');  new = fullfile (folder, '.tmp-target.txt');
%!   fid = fopen (old, 'w'); fprintf (fid, 'old'); fclose (fid);
%!   fid = fopen (new, 'w'); fprintf (fid, 'new'); fclose (fid);
%!   ckpt_rename (new, old, method{1});
%!   assert (fileread (old), 'new');
%!   assert (! isfile (new));
%! end
%! rmdir (folder, 's');

%!error <cannot rename> ckpt_rename (tempname (), tempname ())
